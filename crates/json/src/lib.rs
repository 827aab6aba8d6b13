//! JSON as Python's `json` module reads it. diffusers and transformers save every config with
//! `json.dumps`, which writes the non-finite floats `NaN`, `Infinity` and `-Infinity` as bare
//! literals (DPMSolverMultistepScheduler's default `lambda_min_clipped` is `-Infinity`); strict
//! JSON, and so `serde_json`, rejects them.
//!
//! [`parse`] reads such text into a [`serde_json::Value`]. A `Value` cannot hold a non-finite
//! number, so each literal becomes a one-entry object
//! `{"$autopipe_json::non_finite": "<literal>"}`, the way `serde_json` marks its own
//! arbitrary-precision numbers. [`from_value`] and [`from_str`]
//! deserialize a typed value with those objects read back as the float they stand for, so an `f64`
//! field receives `-inf`, `inf` or `NaN`; `Value::as_f64` does not see them. Everything else is
//! `serde_json`'s own parsing: the literals inside strings are text, numbers parse the same, and
//! malformed input is an error with its line and column (a column after a literal on the same line
//! counts the marker's length instead).
//!
//! Not `serde_json`'s `arbitrary_precision` feature: it cannot represent `NaN`, its parser still
//! rejects the literals, and, being a feature, it would change number handling for every crate in
//! the build (numbers inside `#[serde(flatten)]` and untagged enums stop deserializing).

use serde::de::value::{MapAccessDeserializer, MapDeserializer, SeqDeserializer};
use serde::de::{DeserializeOwned, IntoDeserializer, Visitor};
use serde::{forward_to_deserialize_any, Deserializer};
use serde_json::{Map, Value};

pub use serde_json::Error;

/// The key of the object that stands for a non-finite number in a [`Value`].
pub const NON_FINITE: &str = "$autopipe_json::non_finite";

/// Python's non-finite literals and their values; `-Infinity` before `Infinity`, which it contains.
const LITERALS: [(&str, f64); 3] = [
    ("-Infinity", f64::NEG_INFINITY),
    ("Infinity", f64::INFINITY),
    ("NaN", f64::NAN),
];

/// Parses JSON text as Python's `json.loads` does, non-finite literals included (see the crate
/// docs).
pub fn parse(text: &str) -> Result<Value, Error> {
    match mark_non_finite(text) {
        Some(marked) => serde_json::from_str(&marked),
        None => serde_json::from_str(text),
    }
}

/// Deserializes `T` from a [`parse`]d value, non-finite numbers included.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, Error> {
    T::deserialize(Decoded(value))
}

/// Deserializes `T` from JSON text as Python's `json` writes it. For a [`Value`], use [`parse`]:
/// a `Value` deserialized through here holds `null` for each non-finite number.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    from_value(parse(text)?)
}

/// `text` with each non-finite literal outside a string replaced by its marker object; `None` when
/// there is none. A literal counts only as a whole JSON value: after `[`, `,`, `:`, whitespace or
/// the start, before `]`, `}`, `,`, whitespace or the end. Anything else is left for `serde_json`
/// to reject, as Python rejects `NaNa`, `+Infinity` or `-NaN`.
fn mark_non_finite(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut marked = None::<String>;
    let (mut copied, mut i, mut in_string) = (0, 0, false);
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        let starts_value = i == 0
            || matches!(bytes[i - 1], b'[' | b',' | b':')
            || bytes[i - 1].is_ascii_whitespace();
        let literal = starts_value
            .then(|| {
                LITERALS
                    .iter()
                    .map(|(l, _)| *l)
                    .find(|l| bytes[i..].starts_with(l.as_bytes()))
            })
            .flatten()
            .filter(|l| {
                bytes.get(i + l.len()).is_none_or(|&next| {
                    matches!(next, b']' | b'}' | b',') || next.is_ascii_whitespace()
                })
            });
        match literal {
            Some(literal) => {
                let out = marked.get_or_insert_with(|| String::with_capacity(text.len() + 64));
                out.push_str(&text[copied..i]);
                out.push_str(&format!("{{\"{NON_FINITE}\":\"{literal}\"}}"));
                i += literal.len();
                copied = i;
            }
            None => i += 1,
        }
    }
    marked.map(|mut out| {
        out.push_str(&text[copied..]);
        out
    })
}

/// The float a marker object stands for.
fn non_finite(map: &Map<String, Value>) -> Option<f64> {
    if map.len() != 1 {
        return None;
    }
    let literal = map.get(NON_FINITE)?.as_str()?;
    LITERALS
        .iter()
        .find(|(l, _)| *l == literal)
        .map(|(_, value)| *value)
}

/// A [`Value`] deserializer that reads marker objects as floats, at any depth.
struct Decoded(Value);

impl<'de> IntoDeserializer<'de, Error> for Decoded {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> Deserializer<'de> for Decoded {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Array(items) => {
                let mut seq = SeqDeserializer::new(items.into_iter().map(Decoded));
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            Value::Object(map) => match non_finite(&map) {
                Some(float) => visitor.visit_f64(float),
                None => {
                    let mut entries =
                        MapDeserializer::new(map.into_iter().map(|(k, v)| (k, Decoded(v))));
                    let value = visitor.visit_map(&mut entries)?;
                    entries.end()?;
                    Ok(value)
                }
            },
            other => other.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            // `{"Variant": content}`: the content may hold marker objects too.
            Value::Object(map) if map.len() == 1 && non_finite(&map).is_none() => visitor
                .visit_enum(MapAccessDeserializer::new(MapDeserializer::new(
                    map.into_iter().map(|(k, v)| (k, Decoded(v))),
                ))),
            other => other.deserialize_enum(name, variants, visitor),
        }
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Config {
        low: f64,
        high: f32,
        nan: Option<f64>,
        list: Vec<f64>,
        text: String,
        quoted: String,
        #[serde(flatten)]
        nested: Nested,
    }

    #[derive(Debug, Deserialize)]
    struct Nested {
        ratio: f64,
        mode: Mode,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    enum Mode {
        #[serde(rename = "clip")]
        Clip,
        Range(f64),
    }

    const PYTHON: &str = r#"{
  "low": -Infinity,
  "high": Infinity,
  "nan": NaN,
  "list": [NaN,-Infinity , 1.5,Infinity],
  "text": "NaN, Infinity and -Infinity",
  "quoted": "a \"-Infinity\" \\",
  "ratio": -Infinity,
  "mode": "clip"
}"#;

    #[test]
    fn non_finite_literals_become_floats() {
        let c: Config = from_str(PYTHON).unwrap();
        assert_eq!(c.low, f64::NEG_INFINITY);
        assert_eq!(c.high, f32::INFINITY);
        assert!(c.nan.unwrap().is_nan());
        assert!(c.list[0].is_nan());
        assert_eq!(c.list[1..], [f64::NEG_INFINITY, 1.5, f64::INFINITY]);
        assert_eq!(
            c.nested.ratio,
            f64::NEG_INFINITY,
            "through #[serde(flatten)]"
        );
        assert_eq!(c.nested.mode, Mode::Clip);
        let m: Mode = from_str(r#"{"Range": -Infinity}"#).unwrap();
        assert_eq!(m, Mode::Range(f64::NEG_INFINITY));
    }

    #[test]
    fn the_same_text_inside_strings_is_untouched() {
        let c: Config = from_str(PYTHON).unwrap();
        assert_eq!(c.text, "NaN, Infinity and -Infinity");
        assert_eq!(c.quoted, r#"a "-Infinity" \"#);
        let v = parse(r#"["NaN", "x\"NaN", NaN]"#).unwrap();
        assert_eq!(v[0], "NaN");
        assert_eq!(v[1], "x\"NaN");
        assert_eq!(v[2][NON_FINITE], "NaN");
    }

    #[test]
    fn values_keep_markers_and_plain_json_is_serde_json() {
        let v = parse(r#"{"a": -Infinity, "b": [Infinity]}"#).unwrap();
        assert_eq!(v["a"], serde_json::json!({ NON_FINITE: "-Infinity" }));
        assert_eq!(v["b"][0], serde_json::json!({ NON_FINITE: "Infinity" }));
        let plain = r#"{"a": [1, -2.5e-3, "NaN", null, true], "b": {"c": 0.1}}"#;
        assert_eq!(
            parse(plain).unwrap(),
            serde_json::from_str::<Value>(plain).unwrap()
        );
        assert_eq!(
            from_value::<f64>(v["a"].clone()).unwrap(),
            f64::NEG_INFINITY
        );
    }

    #[test]
    fn malformed_input_is_still_an_error() {
        for bad in [
            "{",
            r#"{"a": Infinit}"#,
            r#"{"a": NaNa}"#,
            r#"{"a": +Infinity}"#,
            r#"{"a": -NaN}"#,
            r#"{"a": --Infinity}"#,
            "[1NaN]",
            "[NaN1]",
            r#"{NaN: 1}"#,
            r#"{"a": "unterminated NaN}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let err = from_str::<Config>(r#"{"low": "-Infinity"}"#).unwrap_err();
        assert!(err.to_string().contains("expected f64"), "{err}");
    }
}
