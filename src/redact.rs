//! Credentials in URLs, masked wherever a URL is shown or logged: the user and password
//! (`https://user:pass@host/`) and the values of query keys that carry secrets (`token`,
//! `key`, `secret`, `signature`, `sig`, `password`, `access_token`, `api_key`, and any key
//! containing `token`, `secret`, `password` or `signature`, or ending in `key`).

/// What replaces a credential.
const MASK: &str = "***";

/// Whether a query key names a credential.
fn secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["token", "secret", "password", "passwd", "signature", "credential", "auth"]
        .iter()
        .any(|word| key.contains(word))
        || key.ends_with("key")
        || matches!(key.as_str(), "sig" | "pwd" | "code")
}

/// `url` with its credentials masked; the text as it was when it has none or is not a URL.
pub fn mask_url(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else { return url.to_string() };
    let mut masked = false;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        let _ = parsed.set_username(MASK);
        if parsed.password().is_some() {
            let _ = parsed.set_password(Some(MASK));
        }
        masked = true;
    }
    if parsed.query_pairs().any(|(key, _)| secret_key(&key)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if secret_key(&key) { MASK.to_string() } else { value.into_owned() };
                (key.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
        masked = true;
    }
    if masked { parsed.to_string().replace("%2A%2A%2A", MASK) } else { url.to_string() }
}

/// `text` with every URL in it (`http://`, `https://`, `ws://`, `wss://`, up to the next
/// space, quote or bracket) masked: for error messages that quote a URL.
pub fn mask_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) =
        ["http://", "https://", "ws://", "wss://"].iter().filter_map(|scheme| rest.find(scheme)).min()
    {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '(' | ')' | '<' | '>'))
            .map_or(rest.len(), |end| start + end);
        out.push_str(&mask_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_masked_and_the_rest_kept() {
        assert_eq!(mask_url("https://user:pass@hooks.example.com/x"), "https://***:***@hooks.example.com/x");
        assert_eq!(mask_url("https://tok@hooks.example.com/x"), "https://***@hooks.example.com/x");
        assert_eq!(
            mask_url("https://h.example/x?a=1&token=abc&API_KEY=k&sig=s&access_token=t&signature=z&page=2"),
            "https://h.example/x?a=1&token=***&API_KEY=***&sig=***&access_token=***&signature=***&page=2"
        );
        for plain in
            ["http://127.0.0.1:9/hook", "https://h.example", "not a url", "https://h.example/?page=2"]
        {
            assert_eq!(mask_url(plain), plain);
        }
    }

    #[test]
    fn urls_inside_a_message_are_masked() {
        assert_eq!(
            mask_urls_in("error sending request for url (https://u:p@h.example/x?key=1): refused"),
            "error sending request for url (https://***:***@h.example/x?key=***): refused"
        );
        assert_eq!(mask_urls_in("no url here"), "no url here");
    }
}
