//! The configuration reference, `docs/configuration.md`, checked against the code both
//! ways, so that it cannot drift: every key the raw structs accept has a row in one of its
//! key tables, every row names a key they accept, and every default it writes is the one
//! the code gives.
//!
//! The keys come from the code itself: a tracing deserializer drives each struct's
//! `Deserialize` and records the field names serde hands it (the names as written,
//! renames included), descending into every section, list and option. The sink, which
//! reads itself through a buffer, is traced through the enum it reads its fields with, one
//! variant at a time.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;

use serde::Deserialize;
use serde::de::value::{Error, StrDeserializer};
use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

use super::raw::{ExternallyTagged, RawConfig};

/// Where the sink sits, as the tracer writes paths.
const SINK: &str = "subscriptions[].sink";

/// The header row that starts a key table in `docs/configuration.md`.
const KEY_TABLE_HEADER: &str = "| key | type | default | meaning |";

/// Every key path the code accepts, e.g. `admin.listen`, `sources[].tls.ca_file`,
/// `subscriptions[].sink.url`: only the leaves (a key with keys under it is a section,
/// documented by a heading, not a row).
fn code_keys() -> BTreeSet<String> {
    let keys = RefCell::new(BTreeSet::new());
    let variants = Cell::new(0);
    RawConfig::deserialize(Tracer { path: String::new(), keys: &keys, variant: 0, variants: &variants })
        .expect("the tracer drives RawConfig");
    let mut variant = 0;
    loop {
        let path = SINK.to_string();
        ExternallyTagged::deserialize(Tracer { path, keys: &keys, variant, variants: &variants })
            .expect("the tracer drives each sink variant");
        variant += 1;
        if variant >= variants.get() {
            break;
        }
    }
    let keys = keys.into_inner();
    let sections: BTreeSet<String> = keys
        .iter()
        .filter_map(|key| key.rsplit_once('.').map(|(parent, _)| parent.trim_end_matches("[]").to_string()))
        .collect();
    keys.into_iter().filter(|key| !sections.contains(key)).collect()
}

/// The keys of the key tables of `text` (the first cell of each row, a code span), with
/// the problems found reading them (a row that names no key, a key documented twice).
fn documented_keys(text: &str) -> (BTreeSet<String>, Vec<String>) {
    let mut keys = BTreeSet::new();
    let mut problems = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line != KEY_TABLE_HEADER {
            continue;
        }
        lines.next(); // |---|---|...
        for row in lines.by_ref().take_while(|line| line.starts_with('|')) {
            let cell = row.trim_start_matches('|').split('|').next().unwrap_or("").trim();
            match cell.strip_prefix('`').and_then(|cell| cell.strip_suffix('`')) {
                Some(key) if !key.contains('`') => {
                    if !keys.insert(key.to_string()) {
                        problems.push(format!("{key}: documented twice"));
                    }
                }
                _ => problems.push(format!("a key table row does not start with one `key`: {row}")),
            }
        }
    }
    (keys, problems)
}

fn reference() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

#[test]
fn every_key_of_the_code_has_a_row_in_docs_configuration_md() {
    let (documented, problems) = documented_keys(&reference());
    assert!(problems.is_empty(), "docs/configuration.md: {problems:#?}");
    let missing: Vec<_> = code_keys().difference(&documented).cloned().collect();
    assert!(
        missing.is_empty(),
        "keys the configuration accepts but docs/configuration.md omits: {missing:?}"
    );
}

#[test]
fn every_key_in_docs_configuration_md_is_accepted_by_the_code() {
    let (documented, problems) = documented_keys(&reference());
    assert!(problems.is_empty(), "docs/configuration.md: {problems:#?}");
    let unknown: Vec<_> = documented.difference(&code_keys()).cloned().collect();
    assert!(
        unknown.is_empty(),
        "keys docs/configuration.md documents that the configuration does not accept: {unknown:?}"
    );
}

#[test]
fn the_tracer_finds_keys_at_every_depth_and_in_every_sink() {
    let keys = code_keys();
    for key in [
        "admin.listen",
        "nats.url",
        "sources[].tls.fingerprint",
        "sources[].salesforce.flow",
        "sources[].headers",
        "subscriptions[].retry.max_backoff",
        "subscriptions[].sink.type",
        "subscriptions[].sink.subject",
        "subscriptions[].sink.max_in_flight",
    ] {
        assert!(keys.contains(key), "{key} not traced: {keys:?}");
    }
    for section in ["admin", "sources", "sources[].tls", "subscriptions[].sink"] {
        assert!(!keys.contains(section), "{section} is a section, not a key");
    }
}

#[test]
fn key_tables_are_read_row_by_row_and_a_row_without_a_key_is_a_problem() {
    let text = format!(
        "# t\n\n{KEY_TABLE_HEADER}\n|---|---|---|---|\n| `a.b` | string | `\"x\"` | what |\n| `a.c` | bool | `false` | what |\n\nprose | `not.a.key` |\n\n{KEY_TABLE_HEADER}\n|---|---|---|---|\n| `a.b` | string | | twice |\n| no key | | | |\n"
    );
    let (keys, problems) = documented_keys(&text);
    assert_eq!(keys, BTreeSet::from(["a.b".to_string(), "a.c".to_string()]));
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("a.b: documented twice"));
}

/// What the code gives each key when the file leaves it out, as JSON: a configuration with
/// only the required keys (one source with a Salesforce login, a NATS and a webhook
/// subscription, each with an empty `retry`), read and written back.
fn code_defaults() -> serde_json::Value {
    let minimal = serde_json::json!({
        "nats": {},
        "cluster": {},
        "sources": [{ "name": "s", "url": "u", "salesforce": { "flow": "f", "client_id": "c" } }],
        "subscriptions": [
            { "id": "n", "source": "s", "channel": "/c", "retry": {}, "sink": { "type": "nats", "subject": "x" } },
            { "id": "w", "source": "s", "channel": "/c", "retry": {}, "sink": { "type": "webhook", "url": "u" } },
        ],
    });
    let raw: RawConfig = serde_json::from_value(minimal).expect("the minimal configuration reads");
    serde_json::to_value(&raw).expect("the raw configuration writes")
}

/// The value at `key` (`sources[].tls.insecure`) in `value`, from the first list entry
/// that has it; `Null` when none does.
fn value_at<'v>(value: &'v serde_json::Value, key: &str) -> &'v serde_json::Value {
    let Some((first, rest)) = key.split_once('.') else {
        return value.get(key).unwrap_or(&serde_json::Value::Null);
    };
    match first.strip_suffix("[]") {
        Some(list) => value
            .get(list)
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .map(|entry| value_at(entry, rest))
            .find(|found| !found.is_null())
            .unwrap_or(&serde_json::Value::Null),
        None => value.get(first).map_or(&serde_json::Value::Null, |inner| value_at(inner, rest)),
    }
}

/// The default column of each key table row: `Some(literal)` for a written default (the
/// first code span, read as JSON), `None` for "unset"; required keys are left out.
fn documented_defaults(text: &str) -> Vec<(String, Option<serde_json::Value>)> {
    let mut defaults = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line != KEY_TABLE_HEADER {
            continue;
        }
        lines.next();
        for row in lines.by_ref().take_while(|line| line.starts_with('|')) {
            let cells: Vec<&str> = row.trim_matches('|').split(" | ").map(str::trim).collect();
            let (Some(key), Some(default)) = (cells.first(), cells.get(2)) else { continue };
            let key = key.trim_matches('`').to_string();
            if default.starts_with("required") {
                continue;
            }
            if default.starts_with("unset") {
                defaults.push((key, None));
                continue;
            }
            let literal = default.split('`').nth(1).unwrap_or(default);
            let value = serde_json::from_str(literal)
                .unwrap_or_else(|error| panic!("{key}: default {literal:?} is not a literal: {error}"));
            defaults.push((key, Some(value)));
        }
    }
    defaults
}

#[test]
fn every_default_in_docs_configuration_md_is_the_codes() {
    let code = code_defaults();
    let mut wrong = Vec::new();
    for (key, documented) in documented_defaults(&reference()) {
        let actual = value_at(&code, &key);
        let matches = match (&documented, key.as_str()) {
            // Optional in the raw structs; validation applies these defaults.
            (Some(serde_json::Value::String(size)), "subscriptions[].spool_max_bytes") => {
                actual.is_null()
                    && super::validate::parse_size(size)
                        == Some(super::validate::DEFAULT_SUBSCRIPTION_SPOOL_BYTES)
            }
            (Some(serde_json::Value::String(from)), "subscriptions[].replay_from") => {
                actual.is_null()
                    && super::validate::parse_replay_from(&serde_json::json!(from))
                        == Some(crate::cometd::ReplayPosition::New)
            }
            (Some(value), _) => actual == value,
            (None, _) => actual.is_null(),
        };
        if !matches {
            wrong.push(format!("{key}: documented {documented:?}, the code gives {actual}"));
        }
    }
    assert!(wrong.is_empty(), "defaults docs/configuration.md gets wrong: {wrong:#?}");
}

/// A `Deserializer` that produces no data of its own: it records each struct field it is
/// asked for under `path` and answers every value with the simplest one of its type, so
/// that any derived `Deserialize` walks all its fields.
struct Tracer<'k> {
    /// The path of the value being read (`sources[].tls`).
    path: String,
    /// Every key path seen.
    keys: &'k RefCell<BTreeSet<String>>,
    /// Which variant an enum is read as.
    variant: usize,
    /// How many variants the last enum read has.
    variants: &'k Cell<usize>,
}

impl<'k> Tracer<'k> {
    fn at(&self, path: String) -> Tracer<'k> {
        Tracer { path, keys: self.keys, variant: self.variant, variants: self.variants }
    }

    fn child(&self, field: &str) -> String {
        if self.path.is_empty() { field.to_string() } else { format!("{}.{field}", self.path) }
    }

    /// Records `fields` and reads a map holding each of them.
    fn fields<'de, V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        for field in fields {
            self.keys.borrow_mut().insert(self.child(field));
        }
        visitor.visit_map(Fields { tracer: self, fields, next: 0 })
    }
}

impl<'de> de::Deserializer<'de> for Tracer<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if self.path == SINK {
            // The sink reads a JSON value and then its fields (traced apart): give it one
            // it accepts.
            let sink = serde_json::json!({ "type": "nats", "subject": "s" });
            return de::Deserializer::deserialize_any(sink, visitor).map_err(de::Error::custom);
        }
        visitor.visit_unit()
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_bool(false)
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i64(0)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_u64(0)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_f64(0.0)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_str("")
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_str("")
    }

    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i64(0)
    }

    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_u64(0)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let element = self.at(format!("{}[]", self.path));
        visitor.visit_seq(One(Some(element)))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // A free-form table (`headers`): its keys are the user's.
        visitor.visit_map(de::value::MapDeserializer::new(std::iter::empty::<(&str, &str)>()))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.fields(fields, visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        // The variant is chosen by the `type` key.
        self.keys.borrow_mut().insert(self.child("type"));
        self.variants.set(variants.len());
        let name = variants[self.variant];
        visitor.visit_enum(Variant { tracer: self, name })
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i128 u8 u16 u128 f32 char bytes byte_buf unit unit_struct tuple tuple_struct
        identifier
    }
}

/// A struct's fields, each read from a tracer at its path.
struct Fields<'k> {
    tracer: Tracer<'k>,
    fields: &'static [&'static str],
    next: usize,
}

impl<'de> de::MapAccess<'de> for Fields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        let Some(field) = self.fields.get(self.next) else { return Ok(None) };
        let key: StrDeserializer<'_, Error> = field.into_deserializer();
        seed.deserialize(key).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let field = self.fields[self.next];
        self.next += 1;
        seed.deserialize(self.tracer.at(self.tracer.child(field)))
    }
}

/// A list of one element, read from a tracer at `path[]`.
struct One<'k>(Option<Tracer<'k>>);

impl<'de> de::SeqAccess<'de> for One<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        self.0.take().map(|tracer| seed.deserialize(tracer)).transpose()
    }
}

/// The variant an enum is read as, with its fields beside the `type` key.
struct Variant<'k> {
    tracer: Tracer<'k>,
    name: &'static str,
}

impl<'de, 'k> de::EnumAccess<'de> for Variant<'k> {
    type Error = Error;
    type Variant = Tracer<'k>;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Tracer<'k>), Error> {
        let name: StrDeserializer<'_, Error> = self.name.into_deserializer();
        Ok((seed.deserialize(name)?, self.tracer))
    }
}

impl<'de> de::VariantAccess<'de> for Tracer<'_> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.fields(fields, visitor)
    }
}
