//! Reading the files a configuration names (the configuration itself, `file:` secrets,
//! CA bundles, private keys) with a bound: a path pointed at `/dev/zero`, a log file or a
//! device by mistake gives a readable problem instead of reading without end.

use std::io::Read;
use std::path::Path;

/// The most a secret or a private key file may hold.
pub const SECRET_FILE_BYTES: u64 = 1 << 20;

/// The most a configuration file or a CA bundle may hold.
pub const CONFIG_FILE_BYTES: u64 = 16 << 20;

/// The bytes of `path`, at most `limit` of them.
///
/// # Errors
/// A readable reason naming the path: it cannot be opened or read, or it holds more than
/// `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|error| format!("{}: {error}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|error| format!("{}: {error}", path.display()))?;
    if bytes.len() as u64 > limit {
        return Err(format!("{}: larger than {limit} bytes; is this the right file?", path.display()));
    }
    Ok(bytes)
}

/// The text of `path`, at most `limit` bytes of UTF-8.
///
/// # Errors
/// As [`read_bounded`], or the file is not UTF-8.
pub fn read_text_bounded(path: &Path, limit: u64) -> Result<String, String> {
    String::from_utf8(read_bounded(path, limit)?).map_err(|_| format!("{}: not UTF-8 text", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_end_is_refused_after_the_limit() {
        let error = read_bounded(Path::new("/dev/zero"), 1024).unwrap_err();
        assert_eq!(error, "/dev/zero: larger than 1024 bytes; is this the right file?");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("small");
        std::fs::write(&file, "exactly ten").unwrap();
        assert_eq!(read_text_bounded(&file, 11).unwrap(), "exactly ten");
        assert!(read_text_bounded(&file, 10).is_err());
        assert!(read_bounded(&dir.path().join("missing"), 10).unwrap_err().contains("missing"));
    }
}
