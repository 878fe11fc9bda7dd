//! Channel names and patterns: `/orders/new`, and the wildcards `/orders/*` (one segment)
//! and `/orders/**` (one or more segments), validated once and matched cheaply.

use std::fmt;
use std::str::FromStr;

use super::error::Error;

/// A valid channel name or pattern.
///
/// It starts with `/`, has no empty segment, and may end in a `*` or `**` segment; a `*`
/// anywhere else is rejected, as Bayeux servers do.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelPattern {
    text: String,
    wildcard: Wildcard,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Wildcard {
    None,
    /// `/a/*`: exactly one more segment.
    One,
    /// `/a/**`: one or more segments.
    Many,
}

impl ChannelPattern {
    /// Parses a channel name or pattern.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] saying what is wrong with it.
    pub fn new(text: &str) -> Result<Self, Error> {
        let invalid = |why: &str| Error::InvalidOptions(format!("channel {text:?} {why}"));
        let rest = text.strip_prefix('/').ok_or_else(|| invalid("does not start with /"))?;
        let segments: Vec<&str> = rest.split('/').collect();
        let last = segments.len() - 1;
        let mut wildcard = Wildcard::None;
        for (index, segment) in segments.iter().enumerate() {
            if segment.is_empty() {
                return Err(invalid("has an empty segment"));
            }
            if segment.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid("contains whitespace"));
            }
            match *segment {
                "*" | "**" if index == last && index > 0 => {
                    wildcard = if *segment == "*" { Wildcard::One } else { Wildcard::Many };
                }
                "*" | "**" if index == last => return Err(invalid("is a wildcard at the root")),
                segment if segment.contains('*') => {
                    return Err(invalid("has a wildcard that is not the whole last segment"));
                }
                _ => {}
            }
        }
        Ok(ChannelPattern { text: text.to_string(), wildcard })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this is a wildcard pattern.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard != Wildcard::None
    }

    /// Whether the concrete channel `channel` is matched by this pattern.
    pub fn matches(&self, channel: &str) -> bool {
        match self.wildcard {
            Wildcard::None => self.text == channel,
            Wildcard::One | Wildcard::Many => {
                // The pattern without its wildcard, keeping the trailing slash: "/a/".
                let stars = if self.wildcard == Wildcard::One { 1 } else { 2 };
                let prefix = &self.text[..self.text.len() - stars];
                let Some(rest) = channel.strip_prefix(prefix) else {
                    return false;
                };
                if rest.is_empty() || rest.split('/').any(str::is_empty) {
                    return false;
                }
                self.wildcard == Wildcard::Many || !rest.contains('/')
            }
        }
    }
}

impl fmt::Display for ChannelPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for ChannelPattern {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        ChannelPattern::new(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> ChannelPattern {
        ChannelPattern::new(text).expect(text)
    }

    #[test]
    fn literal_patterns_match_only_themselves() {
        assert!(pattern("/a/b").matches("/a/b"));
        assert!(!pattern("/a/b").matches("/a/b/c"));
        assert!(!pattern("/a/b").matches("/a"));
    }

    #[test]
    fn one_star_matches_exactly_one_segment() {
        let p = pattern("/chat/*");
        assert!(p.matches("/chat/room"));
        assert!(!p.matches("/chat/room/deeper"));
        assert!(!p.matches("/chat"));
        assert!(!p.matches("/chat/"));
        assert!(!p.matches("/chatter/x"));
    }

    #[test]
    fn two_stars_match_one_or_more_segments() {
        let p = pattern("/news/**");
        assert!(p.matches("/news/x"));
        assert!(p.matches("/news/eu/sport/today"));
        assert!(!p.matches("/news"));
        assert!(!p.matches("/newsroom/x"));
        assert!(!p.matches("/news//x"));
    }

    #[test]
    fn invalid_patterns_are_rejected_with_a_reason() {
        for (text, why) in [
            ("orders", "does not start with /"),
            ("/a//b", "empty segment"),
            ("/", "empty segment"),
            ("/a/b*", "not the whole last segment"),
            ("/*/b", "not the whole last segment"),
            ("/**", "wildcard at the root"),
            ("/a b", "whitespace"),
        ] {
            let error = ChannelPattern::new(text).expect_err(text).to_string();
            assert!(error.contains(why), "{text}: {error}");
        }
    }
}
