//! The shape of a QMP command: `{"execute": NAME, "arguments": {...}, "id": ANY}`.

use serde_json::{Map, Value};

use crate::error::QmpError;

/// A well-formed command.
#[derive(Debug, PartialEq)]
pub(crate) struct Request {
    /// The command name.
    pub command: String,
    /// The arguments (empty if absent).
    pub arguments: Map<String, Value>,
}

/// Takes the `id` out of a message, if it is an object that has one.
///
/// The id is echoed in the reply even when the rest of the message is
/// malformed, as QEMU does.
pub(crate) fn take_id(message: &mut Value) -> Option<Value> {
    message.as_object_mut().and_then(|m| m.remove("id"))
}

/// Checks a message's shape (after [`take_id`]) with QEMU's error texts,
/// before anything is executed.
pub(crate) fn parse_request(message: Value) -> Result<Request, QmpError> {
    let Value::Object(mut map) = message else {
        return Err(QmpError::generic("QMP input must be a JSON object"));
    };
    if let Some(key) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments"))
    {
        return Err(QmpError::generic(format!(
            "QMP input member '{key}' is unexpected"
        )));
    }
    let command = match map.remove("execute") {
        None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'execute' must be a string",
            ))
        }
    };
    let arguments = match map.remove("arguments") {
        None => Map::new(),
        Some(Value::Object(args)) => args,
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'arguments' must be an object",
            ))
        }
    };
    Ok(Request { command, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: Value) -> Result<Request, String> {
        parse_request(v).map_err(|e| e.desc)
    }

    #[test]
    fn well_formed() {
        let r = check(json!({"execute": "x", "arguments": {"a": 1}})).unwrap();
        assert_eq!(r.command, "x");
        assert_eq!(Value::Object(r.arguments), json!({"a": 1}));
        let r = check(json!({"execute": "y"})).unwrap();
        assert!(r.arguments.is_empty());
    }

    #[test]
    fn id_is_taken_first() {
        let mut m = json!({"execute": 3, "id": {"a": [1]}});
        assert_eq!(take_id(&mut m), Some(json!({"a": [1]})));
        assert_eq!(take_id(&mut m), None);
        assert_eq!(take_id(&mut json!([1])), None);
    }

    #[test]
    fn error_texts() {
        assert_eq!(
            check(json!([1])).unwrap_err(),
            "QMP input must be a JSON object"
        );
        assert_eq!(
            check(json!("x")).unwrap_err(),
            "QMP input must be a JSON object"
        );
        assert_eq!(
            check(json!({"execute": "x", "bogus": 1})).unwrap_err(),
            "QMP input member 'bogus' is unexpected"
        );
        assert_eq!(
            check(json!({"exec-oob": "x"})).unwrap_err(),
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(
            check(json!({})).unwrap_err(),
            "QMP input lacks member 'execute'"
        );
        assert_eq!(
            check(json!({"arguments": {}})).unwrap_err(),
            "QMP input lacks member 'execute'"
        );
        assert_eq!(
            check(json!({"execute": ["x"]})).unwrap_err(),
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            check(json!({"execute": "x", "arguments": []})).unwrap_err(),
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            check(json!({"execute": "x", "arguments": null})).unwrap_err(),
            "QMP input member 'arguments' must be an object"
        );
    }
}
