//! QEMU's dotted `key=value,...` syntax.

use serde_json::{Map, Value};

use crate::error::Error;

/// Parses `a=1,b.c=x,,y` into `{"a": "1", "b": {"c": "x,y"}}`.
///
/// A doubled comma is a literal comma. If `implied_key` is given, a first
/// element without `=` is the value of that key.
pub fn parse_keyval(input: &str, implied_key: Option<&str>) -> Result<Map<String, Value>, Error> {
    let mut map = Map::new();
    let mut first = true;
    for element in split_elements(input) {
        let (key, value) = match element.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if first && implied_key.is_some() => {
                (implied_key.unwrap_or_default().to_string(), element.clone())
            }
            None => {
                return Err(Error::InvalidOptions(format!(
                    "Expected '=' after parameter '{element}'"
                )))
            }
        };
        first = false;
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(Error::InvalidOptions(format!("Invalid parameter '{key}'")));
        }
        insert(&mut map, &key, value)?;
    }
    Ok(map)
}

fn split_elements(input: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() || !out.is_empty() {
        out.push(cur);
    }
    out.retain(|e| !e.is_empty());
    out
}

fn insert(map: &mut Map<String, Value>, key: &str, value: String) -> Result<(), Error> {
    let mut cur = map;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if i == parts.len() - 1 {
            if cur.contains_key(*part) {
                return Err(Error::InvalidOptions(format!(
                    "Parameter '{key}' is set more than once"
                )));
            }
            cur.insert(part.to_string(), Value::String(value));
            return Ok(());
        }
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match entry {
            Value::Object(m) => m,
            _ => {
                return Err(Error::InvalidOptions(format!(
                    "Parameter '{}' used inconsistently",
                    parts[..=i].join(".")
                )))
            }
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_and_escaped() {
        let m = parse_keyval(
            "driver=file,node-name=f0,cache.direct=on,filename=a,,b",
            None,
        )
        .unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"driver": "file", "node-name": "f0", "cache": {"direct": "on"}, "filename": "a,b"})
        );
    }

    #[test]
    fn implied_key() {
        let m = parse_keyval("throttle-group,id=tg0", Some("qom-type")).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"qom-type": "throttle-group", "id": "tg0"})
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse_keyval("a=1,a=2", None).is_err());
        assert!(parse_keyval("a=1,a.b=2", None).is_err());
        assert!(parse_keyval("novalue", None).is_err());
        assert!(parse_keyval("a..b=1", None).is_err());
    }
}
