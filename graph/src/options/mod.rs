//! Option parsing in qemu-storage-daemon's shapes.
//!
//! Options arrive either as JSON (QMP, `--blockdev '{...}'`) or as QEMU's
//! dotted `key=value` form. JSON is typed strictly; in `key=value` form every
//! value is a string, converted to the type the schema expects
//! (`on`/`off` booleans, numbers with size suffixes).

mod keyval;
mod lenient;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::Error;

pub use keyval::parse_keyval;

/// How option values are typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    /// Strict JSON types.
    Json,
    /// QEMU's `key=value` form: every scalar is a string.
    Keyval,
}

/// Options of one object (a node, an export, ...) and how they are typed.
#[derive(Clone, Debug)]
pub struct Options {
    /// The options.
    pub map: Map<String, Value>,
    /// How the values are typed.
    pub syntax: Syntax,
}

impl Options {
    /// Options from a JSON value, which must be an object.
    pub fn from_json(value: Value) -> Result<Self, Error> {
        match value {
            Value::Object(map) => Ok(Options {
                map,
                syntax: Syntax::Json,
            }),
            _ => Err(Error::InvalidOptions(
                "Invalid parameter type, expected: object".into(),
            )),
        }
    }

    /// Options from a command-line argument: JSON if it starts with `{`,
    /// otherwise `key=value` pairs (`implied_key` names a leading bare value).
    pub fn from_arg(arg: &str, implied_key: Option<&str>) -> Result<Self, Error> {
        if arg.trim_start().starts_with('{') {
            let value = serde_json::from_str(arg)
                .map_err(|e| Error::InvalidOptions(format!("JSON parse error, {e}")))?;
            Self::from_json(value)
        } else {
            Ok(Options {
                map: parse_keyval(arg, implied_key)?,
                syntax: Syntax::Keyval,
            })
        }
    }

    /// Removes and returns the keys in `keys`, keeping the syntax.
    pub fn split_off(&mut self, keys: &[&str]) -> Options {
        let map = keys
            .iter()
            .filter_map(|k| self.map.remove(*k).map(|v| (k.to_string(), v)))
            .collect();
        Options {
            map,
            syntax: self.syntax,
        }
    }

    /// Removes and returns one key's value.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    /// Deserializes the options into `T`, with errors that name the key
    /// (prefixed by `prefix`, for nested objects).
    pub fn parse<T: DeserializeOwned>(self, prefix: &str) -> Result<T, Error> {
        let value = Value::Object(self.map);
        let result = match self.syntax {
            Syntax::Json => serde_path_to_error::deserialize(value),
            Syntax::Keyval => serde_path_to_error::deserialize(lenient::Lenient(value)),
        };
        result.map_err(|e| Error::InvalidOptions(describe(prefix, e)))
    }
}

/// Turns a serde error into QMP's wording, naming the offending key.
fn describe<E: std::fmt::Display>(prefix: &str, e: serde_path_to_error::Error<E>) -> String {
    let mut path = prefix.to_string();
    let p = e.path().to_string();
    if p != "." {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(&p);
    }
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    let msg = e.inner().to_string();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let key = rest.split('`').next().unwrap_or(rest);
        // The path already ends in the unknown key.
        let full = if path.ends_with(key) {
            path.clone()
        } else {
            join(key)
        };
        format!("Parameter '{full}' is unexpected")
    } else if let Some(rest) = msg.strip_prefix("missing field `") {
        let key = rest.split('`').next().unwrap_or(rest);
        format!("Parameter '{}' is missing", join(key))
    } else if msg.starts_with("unknown variant") {
        let value = msg.split('`').nth(1).unwrap_or("");
        format!("Parameter '{path}' does not accept value '{value}'")
    } else if let Some(idx) = msg.find(", expected ") {
        if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
            let expected = &msg[idx + ", expected ".len()..];
            return format!("Invalid parameter type for '{path}', expected: {expected}");
        }
        format!("Parameter '{path}': {msg}")
    } else if path.is_empty() {
        msg
    } else {
        format!("Parameter '{path}': {msg}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Cache {
        #[serde(default)]
        direct: bool,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Sample {
        filename: String,
        #[serde(default)]
        size: Option<u64>,
        #[serde(default)]
        cache: Option<Cache>,
    }

    fn parse(arg: &str) -> Result<Sample, Error> {
        Options::from_arg(arg, None)?.parse("")
    }

    #[test]
    fn keyval_converts_strings() {
        let s = parse("filename=a,,b,size=1M,cache.direct=on").unwrap();
        assert_eq!(s.filename, "a,b");
        assert_eq!(s.size, Some(1 << 20));
        assert_eq!(s.cache, Some(Cache { direct: true }));
    }

    #[test]
    fn json_is_strict() {
        let err = parse(r#"{"filename": "x", "size": "12"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid parameter type for 'size', expected: u64"
        );
        let s = parse(r#"{"filename": "x", "cache": {"direct": true}}"#).unwrap();
        assert_eq!(s.cache, Some(Cache { direct: true }));
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("filename=x,bogus=1").unwrap_err().to_string();
        assert_eq!(e, "Parameter 'bogus' is unexpected");
        let e = parse("size=1").unwrap_err().to_string();
        assert_eq!(e, "Parameter 'filename' is missing");
        let e = parse("filename=x,cache.direct=maybe")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("Invalid parameter type for 'cache.direct'"),
            "{e}"
        );
        let e = parse("filename=x,cache.what=on").unwrap_err().to_string();
        assert_eq!(e, "Parameter 'cache.what' is unexpected");
    }
}
