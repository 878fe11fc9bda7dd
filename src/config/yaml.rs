//! A guard for YAML configuration files: the loader under the `config` crate copies an
//! anchored node at each alias, with no bound, so nine lines of nested aliases ("billion
//! laughs") would take gigabytes before any key is read. The file's events are counted
//! first, each alias weighing what it expands to, and a file that would grow past
//! [`MAX_NODES`] is refused with a problem.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};

/// The most values (scalars, lists and maps, aliases expanded) a YAML configuration may
/// hold: hundreds of times more than a large configuration needs.
pub const MAX_NODES: u64 = 100_000;

/// Why `text` may not be loaded, when its aliases expand it past [`MAX_NODES`]. A text
/// the parser refuses is left to the loader, which reports the syntax error.
pub fn expansion_problem(text: &str) -> Option<String> {
    let mut parser = Parser::new_from_str(text);
    // Each open list or map with its anchor and the values counted in it so far; the
    // first entry is the whole stream.
    let mut open: Vec<(usize, u64)> = vec![(0, 0)];
    let mut anchored: HashMap<usize, u64> = HashMap::new();
    loop {
        let Ok((event, _)) = parser.next_token() else { return None };
        let done = match event {
            Event::StreamEnd => return None,
            Event::Scalar(_, _, anchor, _) => Some((anchor, 1)),
            Event::Alias(anchor) => Some((0, anchored.get(&anchor).copied().unwrap_or(1))),
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                open.push((anchor, 1));
                None
            }
            // The stream's own entry stays, whatever the parser emits.
            Event::SequenceEnd | Event::MappingEnd if open.len() > 1 => open.pop(),
            _ => None,
        };
        if let Some((anchor, nodes)) = done {
            if anchor != 0 {
                anchored.insert(anchor, nodes);
            }
            let parent = open.last_mut()?;
            parent.1 = parent.1.saturating_add(nodes);
            if open.iter().any(|(_, counted)| *counted > MAX_NODES) {
                return Some(format!(
                    "YAML aliases expand this file to more than {MAX_NODES} values; write the repeated parts out, or use fewer nested aliases"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_aliases_that_would_take_gigabytes_are_refused_at_once() {
        let mut text =
            String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
        for (name, previous) in
            ["b", "c", "d", "e", "f", "g", "h", "i"].iter().zip(["a", "b", "c", "d", "e", "f", "g", "h"])
        {
            text.push_str(&format!("{name}: &{name} [{}]\n", vec![format!("*{previous}"); 9].join(",")));
        }
        let problem = expansion_problem(&text).expect("refused");
        assert!(problem.contains("100000 values"), "{problem}");
    }

    #[test]
    fn a_configuration_using_a_few_aliases_is_left_alone() {
        let text = "defaults: &retry { max_elapsed: 1h, max_backoff: 10s }\nsubscriptions:\n  - id: a\n    retry: *retry\n  - id: b\n    retry: *retry\n";
        assert_eq!(expansion_problem(text), None);
        assert_eq!(expansion_problem("not: [valid"), None, "left to the loader's own error");
    }
}
