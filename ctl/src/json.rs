//! Server output: one JSON object per line, ASCII only, in QEMU's layout.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::{Formatter, Serializer};

/// serde_json formatter that writes `", "` and `": "` separators, as QEMU
/// does, and escapes every non-ASCII character as `\uXXXX` (UTF-16
/// surrogate pairs beyond the BMP), so the output is pure ASCII.
struct QmpFormatter;

impl Formatter for QmpFormatter {
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut rest = fragment;
        while let Some(pos) = rest.find(|c: char| !c.is_ascii()) {
            w.write_all(&rest.as_bytes()[..pos])?;
            let c = rest[pos..].chars().next().unwrap_or('\u{fffd}');
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(w, "\\u{unit:04x}")?;
            }
            rest = &rest[pos + c.len_utf8()..];
        }
        w.write_all(rest.as_bytes())
    }
}

/// Serializes `value` as one protocol message: ASCII JSON followed by CRLF.
pub(crate) fn to_line<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut ser = Serializer::with_formatter(&mut out, QmpFormatter);
    if value.serialize(&mut ser).is_err() {
        // Only non-string map keys can fail, and our messages have none;
        // still, never send half a message.
        out.clear();
        out.extend_from_slice(
            br#"{"error": {"class": "GenericError", "desc": "Internal error: reply could not be serialized"}}"#,
        );
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(v: serde_json::Value) -> String {
        String::from_utf8(to_line(&v)).unwrap()
    }

    #[test]
    fn qemu_layout_with_crlf() {
        assert_eq!(line(json!({"return": {}})), "{\"return\": {}}\r\n");
        assert_eq!(
            line(json!({"a": [1, 2, {"b": null}], "c": "d"})),
            "{\"a\": [1, 2, {\"b\": null}], \"c\": \"d\"}\r\n"
        );
    }

    #[test]
    fn output_is_ascii() {
        let v = json!({"d\u{e9}sc": "caf\u{e9} \u{1f600} \u{7f} \n \"q\" \\"});
        let s = line(v.clone());
        assert!(s.is_ascii(), "{s}");
        assert_eq!(
            s,
            "{\"d\\u00e9sc\": \"caf\\u00e9 \\ud83d\\ude00 \u{7f} \\n \\\"q\\\" \\\\\"}\r\n"
        );
        // And it parses back to the same value.
        let back: serde_json::Value = serde_json::from_str(s.trim_end()).unwrap();
        assert_eq!(back, v);
    }
}
