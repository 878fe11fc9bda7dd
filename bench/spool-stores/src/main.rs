//! spool-stores: compare embedded databases on the cometd-bridge spool workload.
//!
//! Usage:
//!   spool-stores <redb|fjall|sqlite>   one repetition in this process, prints a RESULT line
//!   spool-stores all [reps]            spawns itself per candidate and repetition (default 3),
//!                                      prints a markdown table of medians and writes RESULTS.md
//!
//! Workload (identical per candidate, fresh temp dir per phase set):
//!   A. append 60,000 x 1 KiB messages, 4 subscriptions interleaved, 256 per durable txn
//!   B. drain: per subscription, txn { read next 512 in key order, delete them, write pos/<sub> }
//!   C. (fresh store) append 60,000 x 1 KiB, 16 per durable txn

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MESSAGES: u64 = 60_000;
const SUBS: u64 = 4;
const MSG_SIZE: usize = 1024;
const BIG_BATCH: u64 = 256;
const SMALL_BATCH: u64 = 16;
const DRAIN_BATCH: usize = 512;
const CANDIDATES: [&str; 3] = ["redb", "fjall", "sqlite"];

fn sub_name(i: u64) -> String {
    format!("sub-{i:04}")
}

/// Deterministic, incompressible-ish payload (xorshift64*), stamped with sub and seq.
fn payload(sub: u64, seq: u64, buf: &mut [u8; MSG_SIZE]) {
    let mut x = (sub.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq.wrapping_add(1)) | 1;
    for chunk in buf.chunks_exact_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        chunk.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    buf[0..8].copy_from_slice(&sub.to_be_bytes());
    buf[8..16].copy_from_slice(&seq.to_be_bytes());
}

/// Message i of the interleaved stream goes to subscription i % SUBS with sequence i / SUBS.
fn message_key(i: u64) -> (u64, u64) {
    (i % SUBS, i / SUBS)
}

/// What a candidate store must do. Every method is one durable transaction.
trait Spool {
    /// Append messages [from, to) of the interleaved stream in one durable transaction.
    fn append_batch(&mut self, from: u64, to: u64) -> Result<(), String>;
    /// Read up to `max` oldest messages of `sub`, delete them and write pos/<sub>, in one
    /// durable transaction. Returns the sequences read (in order) and the bytes read.
    fn drain_batch(&mut self, sub: &str, max: usize) -> Result<(Vec<u64>, usize), String>;
    /// Make sure everything is on disk / closed before measuring size (called on drop too).
    fn close(self: Box<Self>) -> Result<(), String>;
}

// ---------------------------------------------------------------- redb
mod redb_store {
    use super::*;
    use redb::{Database, Durability, ReadableTable, TableDefinition};

    const SPOOL: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("spool");
    const POS: TableDefinition<&str, u64> = TableDefinition::new("pos");

    pub struct Store {
        db: Database,
        subs: Vec<String>,
    }

    fn e<E: std::fmt::Display>(x: E) -> String {
        format!("redb: {x}")
    }

    pub fn open(dir: &Path) -> Result<Box<dyn Spool>, String> {
        let db = Database::create(dir.join("spool.redb")).map_err(e)?;
        Ok(Box::new(Store { db, subs: (0..SUBS).map(sub_name).collect() }))
    }

    impl Spool for Store {
        fn append_batch(&mut self, from: u64, to: u64) -> Result<(), String> {
            let mut tx = self.db.begin_write().map_err(e)?;
            tx.set_durability(Durability::Immediate).map_err(e)?;
            {
                let mut t = tx.open_table(SPOOL).map_err(e)?;
                let mut buf = [0u8; MSG_SIZE];
                for i in from..to {
                    let (s, seq) = message_key(i);
                    payload(s, seq, &mut buf);
                    t.insert((self.subs[s as usize].as_str(), seq), &buf[..]).map_err(e)?;
                }
            }
            tx.commit().map_err(e)
        }

        fn drain_batch(&mut self, sub: &str, max: usize) -> Result<(Vec<u64>, usize), String> {
            let mut tx = self.db.begin_write().map_err(e)?;
            tx.set_durability(Durability::Immediate).map_err(e)?;
            let mut seqs = Vec::with_capacity(max);
            let mut bytes = 0usize;
            {
                let mut t = tx.open_table(SPOOL).map_err(e)?;
                for item in t.range((sub, 0u64)..=(sub, u64::MAX)).map_err(e)?.take(max) {
                    let (k, v) = item.map_err(e)?;
                    seqs.push(k.value().1);
                    bytes += v.value().len(); // "deliver": touch the payload
                }
                for &seq in &seqs {
                    t.remove((sub, seq)).map_err(e)?;
                }
                if let Some(&last) = seqs.last() {
                    let mut p = tx.open_table(POS).map_err(e)?;
                    p.insert(sub, last).map_err(e)?;
                }
            }
            tx.commit().map_err(e)?;
            Ok((seqs, bytes))
        }

        fn close(self: Box<Self>) -> Result<(), String> {
            drop(self.db);
            Ok(())
        }
    }
}

// ---------------------------------------------------------------- fjall
mod fjall_store {
    use super::*;
    use fjall::{
        KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace,
    };

    pub struct Store {
        db: SingleWriterTxDatabase,
        spool: SingleWriterTxKeyspace,
        pos: SingleWriterTxKeyspace,
        subs: Vec<String>,
    }

    fn e<E: std::fmt::Display>(x: E) -> String {
        format!("fjall: {x}")
    }

    /// Key = sub bytes, 0x00, big-endian u64 seq: byte order == (sub, seq) order.
    fn key(sub: &str, seq: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(sub.len() + 9);
        k.extend_from_slice(sub.as_bytes());
        k.push(0);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    pub fn open(dir: &Path) -> Result<Box<dyn Spool>, String> {
        let db = SingleWriterTxDatabase::builder(dir.join("fjall")).open().map_err(e)?;
        let spool = db.keyspace("spool", KeyspaceCreateOptions::default).map_err(e)?;
        let pos = db.keyspace("pos", KeyspaceCreateOptions::default).map_err(e)?;
        Ok(Box::new(Store { db, spool, pos, subs: (0..SUBS).map(sub_name).collect() }))
    }

    impl Spool for Store {
        fn append_batch(&mut self, from: u64, to: u64) -> Result<(), String> {
            let mut tx = self.db.write_tx().durability(Some(PersistMode::SyncData));
            let mut buf = [0u8; MSG_SIZE];
            for i in from..to {
                let (s, seq) = message_key(i);
                payload(s, seq, &mut buf);
                tx.insert(&self.spool, key(&self.subs[s as usize], seq), &buf[..]);
            }
            tx.commit().map_err(e)
        }

        fn drain_batch(&mut self, sub: &str, max: usize) -> Result<(Vec<u64>, usize), String> {
            let mut tx = self.db.write_tx().durability(Some(PersistMode::SyncData));
            let mut seqs = Vec::with_capacity(max);
            let mut keys = Vec::with_capacity(max);
            let mut bytes = 0usize;
            let mut prefix = sub.as_bytes().to_vec();
            prefix.push(0);
            for guard in tx.prefix(&self.spool, &prefix).take(max) {
                let (k, v) = guard.into_inner().map_err(e)?;
                let seq = u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap());
                seqs.push(seq);
                bytes += v.len();
                keys.push(k);
            }
            for k in keys {
                tx.remove(&self.spool, k);
            }
            if let Some(&last) = seqs.last() {
                tx.insert(&self.pos, format!("pos/{sub}"), last.to_be_bytes().to_vec());
            }
            tx.commit().map_err(e)?;
            Ok((seqs, bytes))
        }

        fn close(self: Box<Self>) -> Result<(), String> {
            self.db.persist(PersistMode::SyncAll).map_err(e)?;
            drop(self.spool);
            drop(self.pos);
            drop(self.db);
            Ok(())
        }
    }
}

// ---------------------------------------------------------------- sqlite
mod sqlite_store {
    use super::*;
    use rusqlite::{params, Connection};

    pub struct Store {
        conn: Connection,
        subs: Vec<String>,
    }

    fn e<E: std::fmt::Display>(x: E) -> String {
        format!("sqlite: {x}")
    }

    pub fn open(dir: &Path) -> Result<Box<dyn Spool>, String> {
        let conn = Connection::open(dir.join("spool.sqlite")).map_err(e)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(e)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(format!("sqlite: journal_mode is {mode}, wanted wal"));
        }
        conn.pragma_update(None, "synchronous", "FULL").map_err(e)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS spool (
                 sub  TEXT    NOT NULL,
                 seq  INTEGER NOT NULL,
                 body BLOB    NOT NULL,
                 PRIMARY KEY (sub, seq));
             CREATE TABLE IF NOT EXISTS pos (
                 key TEXT PRIMARY KEY,
                 val BLOB NOT NULL) WITHOUT ROWID;",
        )
        .map_err(e)?;
        Ok(Box::new(Store { conn, subs: (0..SUBS).map(sub_name).collect() }))
    }

    impl Spool for Store {
        fn append_batch(&mut self, from: u64, to: u64) -> Result<(), String> {
            let tx = self.conn.transaction().map_err(e)?;
            {
                let mut st =
                    tx.prepare_cached("INSERT INTO spool (sub, seq, body) VALUES (?1, ?2, ?3)").map_err(e)?;
                let mut buf = [0u8; MSG_SIZE];
                for i in from..to {
                    let (s, seq) = message_key(i);
                    payload(s, seq, &mut buf);
                    st.execute(params![self.subs[s as usize], seq as i64, &buf[..]]).map_err(e)?;
                }
            }
            tx.commit().map_err(e)
        }

        fn drain_batch(&mut self, sub: &str, max: usize) -> Result<(Vec<u64>, usize), String> {
            let tx = self.conn.transaction().map_err(e)?;
            let mut seqs = Vec::with_capacity(max);
            let mut bytes = 0usize;
            {
                let mut st = tx
                    .prepare_cached("SELECT seq, body FROM spool WHERE sub = ?1 ORDER BY seq LIMIT ?2")
                    .map_err(e)?;
                let mut rows = st.query(params![sub, max as i64]).map_err(e)?;
                while let Some(r) = rows.next().map_err(e)? {
                    let seq: i64 = r.get(0).map_err(e)?;
                    let body = r.get_ref(1).map_err(e)?.as_blob().map_err(e)?;
                    bytes += body.len();
                    seqs.push(seq as u64);
                }
            }
            if let Some(&last) = seqs.last() {
                // Range delete of exactly the rows just read (same snapshot, single writer).
                tx.prepare_cached("DELETE FROM spool WHERE sub = ?1 AND seq <= ?2")
                    .map_err(e)?
                    .execute(params![sub, last as i64])
                    .map_err(e)?;
                tx.prepare_cached("INSERT OR REPLACE INTO pos (key, val) VALUES (?1, ?2)")
                    .map_err(e)?
                    .execute(params![format!("pos/{sub}"), &last.to_be_bytes()[..]])
                    .map_err(e)?;
            }
            tx.commit().map_err(e)?;
            Ok((seqs, bytes))
        }

        fn close(self: Box<Self>) -> Result<(), String> {
            self.conn.close().map_err(|(_, x)| e(x))
        }
    }
}

// ---------------------------------------------------------------- harness

fn open(candidate: &str, dir: &Path) -> Result<Box<dyn Spool>, String> {
    match candidate {
        "redb" => redb_store::open(dir),
        "fjall" => fjall_store::open(dir),
        "sqlite" => sqlite_store::open(dir),
        other => Err(format!("unknown candidate {other}")),
    }
}

/// Apparent size of all files under `dir` (bytes).
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for ent in rd.flatten() {
            let Ok(md) = ent.metadata() else { continue };
            if md.is_dir() {
                stack.push(ent.path());
            } else {
                total += md.len();
            }
        }
    }
    total
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn append_all(store: &mut dyn Spool, batch: u64) -> Result<Duration, String> {
    let t = Instant::now();
    let mut from = 0;
    while from < MESSAGES {
        let to = (from + batch).min(MESSAGES);
        store.append_batch(from, to)?;
        from = to;
    }
    Ok(t.elapsed())
}

fn bench_dir() -> Result<tempfile::TempDir, String> {
    let base =
        std::env::var_os("SPOOL_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new().prefix("spool-stores-").tempdir_in(base).map_err(|x| format!("tempdir: {x}"))
}

/// One repetition of the whole workload for one candidate. Returns key=value pairs.
fn run_one(candidate: &str) -> Result<Vec<(&'static str, f64)>, String> {
    let mut out = Vec::new();

    // A + B: append in batches of 256, then drain.
    let tmp = bench_dir()?;
    let mut store = open(candidate, tmp.path())?;
    let el = append_all(store.as_mut(), BIG_BATCH)?;
    out.push(("append256_per_s", MESSAGES as f64 / el.as_secs_f64()));
    out.push(("size_after_append", dir_size(tmp.path()) as f64));

    let t = Instant::now();
    let mut drained = 0u64;
    let mut bytes = 0usize;
    let max_iters = (MESSAGES as usize / DRAIN_BATCH + 2) * SUBS as usize; // hard bound
    let mut iters = 0usize;
    for s in 0..SUBS {
        let sub = sub_name(s);
        let mut expect = 0u64;
        loop {
            iters += 1;
            if iters > max_iters {
                return Err(format!("{candidate}: drain did not finish in {max_iters} txns"));
            }
            let (seqs, b) = store.drain_batch(&sub, DRAIN_BATCH)?;
            if seqs.is_empty() {
                break;
            }
            for q in &seqs {
                if *q != expect {
                    return Err(format!("{candidate}: {sub} out of order: got {q}, want {expect}"));
                }
                expect += 1;
            }
            drained += seqs.len() as u64;
            bytes += b;
        }
    }
    let el = t.elapsed();
    if drained != MESSAGES || bytes != MESSAGES as usize * MSG_SIZE {
        return Err(format!("{candidate}: drained {drained} msgs / {bytes} bytes"));
    }
    out.push(("drain_per_s", MESSAGES as f64 / el.as_secs_f64()));
    out.push(("size_after_drain_open", dir_size(tmp.path()) as f64));
    store.close()?;
    out.push(("size_after_drain_closed", dir_size(tmp.path()) as f64));
    drop(tmp);

    // C: fresh store, append in batches of 16.
    let tmp = bench_dir()?;
    let mut store = open(candidate, tmp.path())?;
    let el = append_all(store.as_mut(), SMALL_BATCH)?;
    out.push(("append16_per_s", MESSAGES as f64 / el.as_secs_f64()));
    store.close()?;
    drop(tmp);

    out.push(("peak_rss_kib", vm_hwm_kib() as f64));
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mib(b: f64) -> String {
    format!("{:.1}", b / (1024.0 * 1024.0))
}

fn versions() -> String {
    // Read from the Cargo.lock next to the manifest at build time.
    let lock = include_str!("../Cargo.lock");
    let mut out = Vec::new();
    for want in ["redb", "fjall", "lsm-tree", "rusqlite", "libsqlite3-sys", "tempfile"] {
        let mut lines = lock.lines();
        while let Some(l) = lines.next() {
            if l == format!("name = \"{want}\"") {
                if let Some(v) = lines.next() {
                    out.push(format!("{want} {}", v.trim_start_matches("version = ").trim_matches('"')));
                }
                break;
            }
        }
    }
    out.push(format!("SQLite {}", rusqlite::version()));
    out.join(", ")
}

fn run_all(reps: usize) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|x| x.to_string())?;
    let mut results: Vec<Vec<Vec<(String, f64)>>> = vec![Vec::new(); CANDIDATES.len()];
    // Rep-major order so that background noise is spread over the candidates.
    for rep in 0..reps {
        for (ci, c) in CANDIDATES.iter().enumerate() {
            eprintln!("[rep {}/{}] {c} ...", rep + 1, reps);
            let o = Command::new(&exe).arg(c).output().map_err(|x| x.to_string())?;
            let stdout = String::from_utf8_lossy(&o.stdout);
            if !o.status.success() {
                return Err(format!("{c} failed: {}\n{}", o.status, String::from_utf8_lossy(&o.stderr)));
            }
            let line = stdout
                .lines()
                .find(|l| l.starts_with("RESULT "))
                .ok_or(format!("{c}: no RESULT line in output: {stdout}"))?;
            let kv = line
                .split_whitespace()
                .skip(2)
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(f64::NAN)))
                .collect::<Vec<_>>();
            eprintln!("    {line}");
            results[ci].push(kv);
        }
    }
    let med = |ci: usize, k: &str| {
        median(results[ci].iter().filter_map(|r| r.iter().find(|(kk, _)| kk == k).map(|(_, v)| *v)).collect())
    };
    let mut t = String::new();
    t.push_str("| candidate | append, batch 256 (msg/s) | append, batch 16 (msg/s) | drain, 512/txn (msg/s) | size after append (MiB) | size after drain, open (MiB) | size after drain, closed (MiB) | peak RSS (MiB) |\n");
    t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (ci, c) in CANDIDATES.iter().enumerate() {
        t.push_str(&format!(
            "| {c} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {:.1} |\n",
            med(ci, "append256_per_s"),
            med(ci, "append16_per_s"),
            med(ci, "drain_per_s"),
            mib(med(ci, "size_after_append")),
            mib(med(ci, "size_after_drain_open")),
            mib(med(ci, "size_after_drain_closed")),
            med(ci, "peak_rss_kib") / 1024.0,
        ));
    }
    let mut raw = String::new();
    for (ci, c) in CANDIDATES.iter().enumerate() {
        for (ri, r) in results[ci].iter().enumerate() {
            raw.push_str(&format!("- {c} rep {}: ", ri + 1));
            raw.push_str(&r.iter().map(|(k, v)| format!("{k}={v:.0}")).collect::<Vec<_>>().join(" "));
            raw.push('\n');
        }
    }
    let tmpbase =
        std::env::var("SPOOL_BENCH_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    let md = format!(
        "# Spool store benchmark\n\n\
         Generated by `cargo run --release --manifest-path bench/spool-stores/Cargo.toml -- all` \
         (run from the repository root; `SPOOL_BENCH_DIR` overrides the temp dir base, here `{tmpbase}`).\n\n\
         Versions: {}.\n\n\
         Workload: {MESSAGES} messages x {MSG_SIZE} B (pseudo-random, incompressible) for {SUBS} \
         interleaved subscriptions; key = (subscription id, u64 seq). Every transaction is durable \
         (redb `Durability::Immediate` = fdatasync; fjall `PersistMode::SyncData` per write tx; \
         SQLite WAL + `synchronous=FULL`). Drain = per subscription, one transaction each: read the \
         next {DRAIN_BATCH} in key order, delete them, write `pos/<sub>` (8 bytes). The batch-16 append \
         runs on a fresh store. Each candidate and repetition runs in its own process; figures are \
         medians of {reps} repetitions. Sizes are apparent file sizes of the store directory. Peak RSS \
         is VmHWM of the child process (whole run: append 256, drain, append 16).\n\n\
         {t}\n\
         Machine: 2 cores, shared; other builds may have been running concurrently, so absolute \
         numbers are noisy; the ratios are the useful part.\n\n\
         Raw repetitions:\n\n{raw}\n{}",
        versions(),
        include_str!("../NOTES.md"),
    );
    println!("{t}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("RESULTS.md");
    std::fs::write(&path, md).map_err(|x| format!("write {}: {x}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("all") => {
            let reps = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3).clamp(1, 15);
            run_all(reps)
        }
        Some(c) if CANDIDATES.contains(&c) => run_one(c).map(|kv| {
            let body = kv.iter().map(|(k, v)| format!("{k}={v:.1}")).collect::<Vec<_>>().join(" ");
            println!("RESULT {c} {body}");
        }),
        _ => Err(format!("usage: spool-stores <all [reps]|{}>", CANDIDATES.join("|"))),
    };
    if let Err(x) = res {
        eprintln!("error: {x}");
        std::process::exit(1);
    }
}
