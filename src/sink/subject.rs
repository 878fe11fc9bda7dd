//! NATS subject templates: `cometd.{source}.{channel}`, checked when the configuration is
//! loaded so that no message can ever render to an invalid subject.

use std::fmt;

/// A validated subject template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectTemplate {
    text: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Channel,
    Source,
    Subscription,
}

/// What a rendered subject may be built from.
pub struct SubjectValues<'a> {
    /// The message's concrete channel, e.g. `/orders/eu/new`.
    pub channel: &'a str,
    /// The source's name.
    pub source: &'a str,
    /// The subscription's id.
    pub subscription: &'a str,
}

/// Characters NATS does not allow inside a subject token.
fn is_forbidden(c: char) -> bool {
    c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control()
}

/// A value made safe for one subject token: forbidden characters become `_`.
pub fn sanitize_token(value: &str) -> String {
    if value.chars().any(is_forbidden) {
        value.chars().map(|c| if is_forbidden(c) { '_' } else { c }).collect()
    } else {
        value.to_string()
    }
}

impl SubjectTemplate {
    /// Parses and checks a template.
    ///
    /// # Errors
    /// A readable reason: an unknown `{placeholder}`, an unclosed brace, a wildcard,
    /// whitespace, an empty token (`a..b`, a leading or trailing `.`), or a leading `$`
    /// (NATS keeps `$JS.`, `$KV.`, `$SYS.`... for its own APIs, the bridge's state included).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with('$') {
            return Err(format!(
                "{text:?} starts with `$`, which NATS keeps for its own APIs ($JS, $KV, $SYS)"
            ));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find('{') {
                Some(0) => {
                    let end = rest.find('}').ok_or_else(|| format!("unclosed '{{' in {text:?}"))?;
                    parts.push(match &rest[1..end] {
                        "channel" => Part::Channel,
                        "source" => Part::Source,
                        "subscription" => Part::Subscription,
                        other => {
                            return Err(format!(
                                "unknown placeholder {{{other}}} (use {{channel}}, {{source}} or {{subscription}})"
                            ));
                        }
                    });
                    rest = &rest[end + 1..];
                }
                found => {
                    let end = found.unwrap_or(rest.len());
                    let literal = &rest[..end];
                    if literal.contains('}') {
                        return Err(format!("unmatched '}}' in {text:?}"));
                    }
                    if let Some(c) = literal.chars().find(|c| *c == '*' || *c == '>') {
                        return Err(format!("wildcard {c:?} is not allowed in a subject to publish on"));
                    }
                    if literal.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        return Err("whitespace is not allowed in a subject".into());
                    }
                    parts.push(Part::Literal(literal.to_string()));
                    rest = &rest[end..];
                }
            }
        }
        if parts.is_empty() {
            return Err("the subject is empty".into());
        }
        // Placeholders always render to non-empty tokens without dots (except {channel},
        // whose dots separate non-empty tokens), so checking the literal skeleton with a
        // stand-in token catches every empty token.
        let skeleton: String = parts
            .iter()
            .map(|part| match part {
                Part::Literal(literal) => literal.as_str(),
                _ => "x",
            })
            .collect();
        if skeleton.split('.').any(str::is_empty) {
            return Err(format!(
                "{text:?} can render an empty token (check for '..' or a leading or trailing '.')"
            ));
        }
        Ok(SubjectTemplate { text: text.to_string(), parts })
    }

    /// Whether every subject it renders starts with `prefix` (its leading literal does):
    /// such a template is refused when `prefix` is reserved, like `$`.
    pub fn always_starts_with(&self, prefix: &str) -> bool {
        matches!(self.parts.first(), Some(Part::Literal(literal)) if literal.starts_with(prefix))
    }

    /// Renders the subject for one message.
    pub fn render(&self, values: &SubjectValues<'_>) -> String {
        let mut subject = String::with_capacity(self.text.len() + values.channel.len() + 16);
        for part in &self.parts {
            match part {
                Part::Literal(literal) => subject.push_str(literal),
                Part::Source => subject.push_str(&non_empty(sanitize_token(values.source))),
                Part::Subscription => subject.push_str(&non_empty(sanitize_token(values.subscription))),
                Part::Channel => {
                    let mut first = true;
                    for segment in values.channel.split('/').filter(|segment| !segment.is_empty()) {
                        if !first {
                            subject.push('.');
                        }
                        subject.push_str(&sanitize_token(segment));
                        first = false;
                    }
                    if first {
                        subject.push('_');
                    }
                }
            }
        }
        subject
    }
}

fn non_empty(token: String) -> String {
    if token.is_empty() { "_".into() } else { token }
}

impl fmt::Display for SubjectTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, channel: &str) -> String {
        SubjectTemplate::parse(template).expect(template).render(&SubjectValues {
            channel,
            source: "demo src",
            subscription: "orders.v1",
        })
    }

    #[test]
    fn channels_become_dotted_tokens_and_names_are_sanitized() {
        assert_eq!(render("cometd.{source}.{channel}", "/orders/eu/new"), "cometd.demo_src.orders.eu.new");
        assert_eq!(render("x.{subscription}", "/a"), "x.orders_v1");
        assert_eq!(render("x.{channel}", "/a b/c*d/e>f/g.h"), "x.a_b.c_d.e_f.g_h");
    }

    #[test]
    fn templates_that_could_render_an_invalid_subject_are_rejected() {
        for (template, why) in [
            ("", "empty"),
            ("a..{channel}", "empty token"),
            (".{channel}", "empty token"),
            ("{channel}.", "empty token"),
            ("a.*", "wildcard"),
            ("a.>", "wildcard"),
            ("a b.{channel}", "whitespace"),
            ("a.{nope}", "unknown placeholder"),
            ("a.{channel", "unclosed"),
            ("a}.b", "unmatched"),
            ("$KV.cometd-bridge-subscriptions.{channel}", "starts with `$`"),
            ("$JS.API.x", "starts with `$`"),
        ] {
            let error = SubjectTemplate::parse(template).expect_err(template);
            assert!(error.contains(why), "{template}: {error}");
        }
        assert!(SubjectTemplate::parse("{source}{channel}").is_ok());
    }
}
