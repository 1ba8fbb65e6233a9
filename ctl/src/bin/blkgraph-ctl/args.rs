//! Command arguments from the command line: one JSON object, or
//! `key=value` / `key:=JSON` pairs with dotted keys for nesting.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// An argument tree while it is built: dotted keys make branches.
enum Node {
    Leaf(Value),
    Branch(BTreeMap<String, Node>),
}

/// Builds a command's `arguments` object from command-line words.
///
/// * a single word starting with `{` is taken as a JSON object;
/// * `key=value`: `true`/`false` become booleans, `null` null, integers
///   numbers, anything else a string;
/// * `key:=JSON`: any JSON value (`actions:='[...]'`, `name:='"42"'`);
/// * `a.b=x` nests (`{"a": {"b": "x"}}`), and an object whose keys are
///   exactly `0`, `1`, ... becomes an array (`enable.0=oob`).
pub fn parse_arguments(words: &[String]) -> Result<Map<String, Value>, String> {
    if let [word] = words {
        if word.trim_start().starts_with('{') {
            return match serde_json::from_str(word) {
                Ok(Value::Object(map)) => Ok(map),
                Ok(_) => Err("the JSON arguments must be an object".into()),
                Err(e) => Err(format!("invalid JSON arguments: {e}")),
            };
        }
    }
    let mut root = BTreeMap::new();
    for word in words {
        let (key, value) = parse_pair(word)?;
        insert(&mut root, &key, value)?;
    }
    match branch_value(root) {
        Value::Object(map) => Ok(map),
        // The top level keeps numeric keys as they are.
        Value::Array(items) => Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect()),
        _ => Ok(Map::new()),
    }
}

/// Splits `key=value` or `key:=JSON`.
fn parse_pair(word: &str) -> Result<(String, Value), String> {
    let Some((key, text)) = word.split_once('=') else {
        return Err(format!(
            "'{word}' is not key=value, key:=JSON or a JSON object"
        ));
    };
    let (key, value) = match key.strip_suffix(':') {
        Some(key) => {
            let value =
                serde_json::from_str(text).map_err(|e| format!("invalid JSON for '{key}': {e}"))?;
            (key, value)
        }
        None => (key, typed(text)),
    };
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(format!("invalid key '{key}' in '{word}'"));
    }
    Ok((key.to_string(), value))
}

/// Types a `key=value` value.
fn typed(text: &str) -> Value {
    match text {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        "null" => return Value::Null,
        _ => {}
    }
    // Only canonical integers: "007", "+1" and "1e3" stay strings.
    if let Ok(n) = text.parse::<i64>() {
        if n.to_string() == text {
            return Value::from(n);
        }
    } else if let Ok(n) = text.parse::<u64>() {
        if n.to_string() == text {
            return Value::from(n);
        }
    }
    Value::String(text.to_string())
}

fn insert(root: &mut BTreeMap<String, Node>, key: &str, value: Value) -> Result<(), String> {
    let mut map = root;
    let mut path = String::new();
    let mut segments = key.split('.').peekable();
    while let Some(segment) = segments.next() {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(segment);
        if segments.peek().is_none() {
            if map.contains_key(segment) {
                return Err(format!("'{path}' is given more than once"));
            }
            map.insert(segment.to_string(), Node::Leaf(value));
            return Ok(());
        }
        let node = map
            .entry(segment.to_string())
            .or_insert_with(|| Node::Branch(BTreeMap::new()));
        map = match node {
            Node::Branch(children) => children,
            Node::Leaf(_) => {
                return Err(format!("'{path}' is given both a value and members"));
            }
        };
    }
    Ok(())
}

fn branch_value(children: BTreeMap<String, Node>) -> Value {
    let is_list = (0..children.len()).all(|i| children.contains_key(&i.to_string()));
    let mut values: Vec<(String, Value)> = children
        .into_iter()
        .map(|(k, node)| {
            let v = match node {
                Node::Leaf(v) => v,
                Node::Branch(c) => branch_value(c),
            };
            (k, v)
        })
        .collect();
    if is_list && !values.is_empty() {
        values.sort_by_key(|(k, _)| k.parse::<usize>().unwrap_or(usize::MAX));
        Value::Array(values.into_iter().map(|(_, v)| v).collect())
    } else {
        Value::Object(values.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(words: &[&str]) -> Result<Value, String> {
        let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        parse_arguments(&words).map(Value::Object)
    }

    #[test]
    fn json_object() {
        assert_eq!(
            args(&[r#" {"node-name": "n0", "x": [1]}"#]).unwrap(),
            json!({"node-name": "n0", "x": [1]})
        );
        assert_eq!(
            args(&["[1]"]).unwrap_err(),
            "'[1]' is not key=value, key:=JSON or a JSON object"
        );
        assert!(args(&["{\"a\":"])
            .unwrap_err()
            .starts_with("invalid JSON arguments: "));
        assert_eq!(
            args(&["{\"a\": 1}", "b=2"]).unwrap_err(),
            "'{\"a\": 1}' is not key=value, key:=JSON or a JSON object"
        );
    }

    #[test]
    fn typed_values() {
        assert_eq!(
            args(&[
                "a=true",
                "b=false",
                "c=null",
                "d=42",
                "e=-7",
                "f=007",
                "g=1.5",
                "h=",
                "i=on",
                "j=18446744073709551615",
                "k=+1",
                "l=a=b",
            ])
            .unwrap(),
            json!({"a": true, "b": false, "c": null, "d": 42, "e": -7, "f": "007",
                "g": "1.5", "h": "", "i": "on", "j": 18446744073709551615u64, "k": "+1",
                "l": "a=b"})
        );
    }

    #[test]
    fn dotted_keys_nest() {
        assert_eq!(
            args(&[
                "driver=raw",
                "node-name=disk0",
                "file.driver=file",
                "file.filename=/tmp/x.img",
                "file.cache.direct=true",
            ])
            .unwrap(),
            json!({"driver": "raw", "node-name": "disk0",
                "file": {"driver": "file", "filename": "/tmp/x.img", "cache": {"direct": true}}})
        );
    }

    #[test]
    fn numeric_keys_make_arrays() {
        assert_eq!(
            args(&["enable.1=b", "enable.0=a", "m.0=x", "m.2=y"]).unwrap(),
            json!({"enable": ["a", "b"], "m": {"0": "x", "2": "y"}})
        );
        let many: Vec<String> = (0..12).map(|i| format!("l.{i}={i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            args(&many).unwrap(),
            json!({"l": (0..12).collect::<Vec<_>>()})
        );
    }

    #[test]
    fn raw_json_values() {
        assert_eq!(
            args(&[
                r#"actions:=[{"type": "abort", "data": {}}]"#,
                r#"name:="42""#,
                "n:=1.5",
                "o:={}",
            ])
            .unwrap(),
            json!({"actions": [{"type": "abort", "data": {}}], "name": "42", "n": 1.5, "o": {}})
        );
        assert!(args(&["a:=[1"])
            .unwrap_err()
            .starts_with("invalid JSON for 'a': "));
    }

    #[test]
    fn bad_keys_and_conflicts() {
        assert_eq!(
            args(&["novalue"]).unwrap_err(),
            "'novalue' is not key=value, key:=JSON or a JSON object"
        );
        assert_eq!(args(&["=1"]).unwrap_err(), "invalid key '' in '=1'");
        assert_eq!(
            args(&["a..b=1"]).unwrap_err(),
            "invalid key 'a..b' in 'a..b=1'"
        );
        assert_eq!(args(&["a.=1"]).unwrap_err(), "invalid key 'a.' in 'a.=1'");
        assert_eq!(
            args(&["a=1", "a=2"]).unwrap_err(),
            "'a' is given more than once"
        );
        assert_eq!(
            args(&["a=1", "a.b=2"]).unwrap_err(),
            "'a' is given both a value and members"
        );
        assert_eq!(
            args(&["a.b=2", "a=1"]).unwrap_err(),
            "'a' is given more than once"
        );
    }

    #[test]
    fn no_words_no_arguments() {
        assert_eq!(args(&[]).unwrap(), json!({}));
    }
}
