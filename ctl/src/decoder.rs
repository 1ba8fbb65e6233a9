//! Splits the client's byte stream into JSON messages.
//!
//! A small push-down automaton checks the JSON grammar byte by byte, so a
//! message ends exactly at its last byte whatever the line layout (several
//! objects on one line, one object over several lines), and a syntax error
//! is noticed at the first byte that cannot continue the message. After an
//! error the decoder discards input up to the end of that line and starts
//! afresh, so a line-oriented client such as `qemu.qmp` is back in sync with
//! its next line. As in QEMU, sending a control character (other than tab,
//! CR and LF) and a newline resets a decoder stuck in an unfinished message.
//!
//! Complete messages are parsed with `serde_json`, which also checks what
//! the automaton leaves out (UTF-8 validity, number ranges).

use std::collections::VecDeque;

use serde_json::Value;

/// Maximum nesting of arrays and objects: the most `serde_json` parses.
pub(crate) const MAX_DEPTH: usize = 127;

/// What the decoder found in the input.
#[derive(Debug, PartialEq)]
pub(crate) enum Item {
    /// A complete JSON value.
    Value(Value),
    /// Malformed input, with the text for the error reply
    /// (`"JSON parse error, ..."`).
    Error(String),
    /// A message longer than the limit. The decoder ignores all further
    /// input: the connection should be closed.
    TooLarge,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Container {
    Object,
    Array,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Num {
    /// After `-`.
    Minus,
    /// A leading `0`.
    Zero,
    /// Integer digits.
    Int,
    /// After `.`.
    Dot,
    /// Fraction digits.
    Frac,
    /// After `e`/`E`.
    Exp,
    /// After the exponent's sign.
    ExpSign,
    /// Exponent digits.
    ExpDigits,
}

impl Num {
    /// Whether a number may end in this state.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// Between messages: whitespace is skipped.
    Idle,
    /// After an error: input is discarded up to and including a newline.
    Skip,
    /// After an oversized message: all input is discarded.
    Dead,
    /// A value must follow.
    Value,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value in a container: `,` or the closing bracket.
    CommaOrEnd,
    /// In a string (`key`: an object key); `escape`: after a backslash;
    /// `hex`: digits still due in a `\u` escape.
    Str { key: bool, escape: bool, hex: u8 },
    /// In a number.
    Num(Num),
    /// In `true`, `false` or `null`: the word and how much of it was read.
    Literal { word: &'static [u8], pos: usize },
}

/// What one byte did.
enum Step {
    /// The byte is part of the message.
    Take,
    /// The byte is part of the message and completes a value.
    TakeEnd,
    /// A number ended just before this byte: complete it, then look at the
    /// byte again.
    EndRetry,
    /// The byte is not part of any message (whitespace between messages,
    /// discarded input).
    Ignore,
}

/// Incremental splitter of a byte stream into JSON values.
pub(crate) struct Decoder {
    state: State,
    stack: Vec<Container>,
    buf: Vec<u8>,
    max_len: usize,
    items: VecDeque<Item>,
}

impl Decoder {
    /// A decoder that rejects messages longer than `max_len` bytes.
    pub(crate) fn new(max_len: usize) -> Self {
        Decoder {
            state: State::Idle,
            stack: Vec::new(),
            buf: Vec::new(),
            max_len,
            items: VecDeque::new(),
        }
    }

    /// Consumes `input`; what it completes is returned by [`Decoder::next_item`].
    pub(crate) fn feed(&mut self, input: &[u8]) {
        for &b in input {
            if self.state == State::Dead {
                return;
            }
            self.byte(b);
        }
    }

    /// The next decoded item, in input order.
    pub(crate) fn next_item(&mut self) -> Option<Item> {
        self.items.pop_front()
    }

    fn byte(&mut self, b: u8) {
        loop {
            match self.step(b) {
                Ok(Step::Take) => {
                    self.take(b);
                    return;
                }
                Ok(Step::TakeEnd) => {
                    if self.take(b) {
                        self.value_done();
                    }
                    return;
                }
                Ok(Step::EndRetry) => self.value_done(),
                Ok(Step::Ignore) => return,
                Err(msg) => {
                    self.fail(b, msg);
                    return;
                }
            }
        }
    }

    /// Appends a message byte; false if that made the message too long.
    fn take(&mut self, b: u8) -> bool {
        if self.buf.len() >= self.max_len {
            self.buf = Vec::new();
            self.stack = Vec::new();
            self.state = State::Dead;
            self.items.push_back(Item::TooLarge);
            return false;
        }
        self.buf.push(b);
        true
    }

    /// A value ended: the message is complete, or its container goes on.
    fn value_done(&mut self) {
        if !self.stack.is_empty() {
            self.state = State::CommaOrEnd;
            return;
        }
        let text = std::mem::take(&mut self.buf);
        self.state = State::Idle;
        let item = match serde_json::from_slice(&text) {
            Ok(v) => Item::Value(v),
            Err(e) => Item::Error(format!("JSON parse error, {e}")),
        };
        self.items.push_back(item);
    }

    /// Reports malformed input at byte `b` and resynchronizes.
    fn fail(&mut self, b: u8, msg: String) {
        self.items
            .push_back(Item::Error(format!("JSON parse error, {msg}")));
        self.buf.clear();
        self.stack.clear();
        self.state = if b == b'\n' { State::Idle } else { State::Skip };
    }

    fn step(&mut self, b: u8) -> Result<Step, String> {
        let ws = matches!(b, b' ' | b'\t' | b'\r' | b'\n');
        match self.state {
            State::Dead => Ok(Step::Ignore),
            State::Skip => {
                if b == b'\n' {
                    self.state = State::Idle;
                }
                Ok(Step::Ignore)
            }
            State::Idle => {
                if ws {
                    Ok(Step::Ignore)
                } else {
                    self.value_start(b)
                }
            }
            State::Value => {
                if ws {
                    Ok(Step::Take)
                } else {
                    self.value_start(b)
                }
            }
            State::ValueOrEnd => match b {
                _ if ws => Ok(Step::Take),
                b']' => self.close(Container::Array),
                _ => self.value_start(b),
            },
            State::KeyOrEnd | State::Key => match b {
                _ if ws => Ok(Step::Take),
                b'"' => {
                    self.state = State::Str {
                        key: true,
                        escape: false,
                        hex: 0,
                    };
                    Ok(Step::Take)
                }
                b'}' if self.state == State::KeyOrEnd => self.close(Container::Object),
                _ => Err(unexpected(b, "a string key")),
            },
            State::Colon => match b {
                _ if ws => Ok(Step::Take),
                b':' => {
                    self.state = State::Value;
                    Ok(Step::Take)
                }
                _ => Err(unexpected(b, "':'")),
            },
            State::CommaOrEnd => {
                let top = self.stack.last().copied();
                match b {
                    _ if ws => Ok(Step::Take),
                    b',' => {
                        self.state = if top == Some(Container::Object) {
                            State::Key
                        } else {
                            State::Value
                        };
                        Ok(Step::Take)
                    }
                    b'}' if top == Some(Container::Object) => self.close(Container::Object),
                    b']' if top == Some(Container::Array) => self.close(Container::Array),
                    _ if top == Some(Container::Object) => Err(unexpected(b, "',' or '}'")),
                    _ => Err(unexpected(b, "',' or ']'")),
                }
            }
            State::Str { key, escape, hex } => self.string_byte(b, key, escape, hex),
            State::Num(n) => self.number_byte(b, n),
            State::Literal { word, pos } => {
                if b != word[pos] {
                    let word = String::from_utf8_lossy(word);
                    return Err(format!("invalid literal, expecting '{word}'"));
                }
                if pos + 1 == word.len() {
                    Ok(Step::TakeEnd)
                } else {
                    self.state = State::Literal { word, pos: pos + 1 };
                    Ok(Step::Take)
                }
            }
        }
    }

    /// The first byte of a value.
    fn value_start(&mut self, b: u8) -> Result<Step, String> {
        self.state = match b {
            b'{' | b'[' => {
                if self.stack.len() >= MAX_DEPTH {
                    return Err("nesting too deep".to_string());
                }
                if b == b'{' {
                    self.stack.push(Container::Object);
                    State::KeyOrEnd
                } else {
                    self.stack.push(Container::Array);
                    State::ValueOrEnd
                }
            }
            b'"' => State::Str {
                key: false,
                escape: false,
                hex: 0,
            },
            b'-' => State::Num(Num::Minus),
            b'0' => State::Num(Num::Zero),
            b'1'..=b'9' => State::Num(Num::Int),
            b't' => State::Literal {
                word: b"true",
                pos: 1,
            },
            b'f' => State::Literal {
                word: b"false",
                pos: 1,
            },
            b'n' => State::Literal {
                word: b"null",
                pos: 1,
            },
            _ => return Err(unexpected(b, "a value")),
        };
        Ok(Step::Take)
    }

    fn close(&mut self, c: Container) -> Result<Step, String> {
        debug_assert_eq!(self.stack.last(), Some(&c));
        self.stack.pop();
        Ok(Step::TakeEnd)
    }

    fn string_byte(&mut self, b: u8, key: bool, escape: bool, hex: u8) -> Result<Step, String> {
        if hex > 0 {
            if !b.is_ascii_hexdigit() {
                return Err(unexpected(b, "a hex digit in '\\u' escape"));
            }
            self.state = State::Str {
                key,
                escape: false,
                hex: hex - 1,
            };
            return Ok(Step::Take);
        }
        if escape {
            let hex = match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => 0,
                b'u' => 4,
                _ => return Err(unexpected(b, "an escape sequence")),
            };
            self.state = State::Str {
                key,
                escape: false,
                hex,
            };
            return Ok(Step::Take);
        }
        match b {
            b'"' if key => {
                self.state = State::Colon;
                Ok(Step::Take)
            }
            b'"' => Ok(Step::TakeEnd),
            b'\\' => {
                self.state = State::Str {
                    key,
                    escape: true,
                    hex: 0,
                };
                Ok(Step::Take)
            }
            0..=0x1f => Err(format!(
                "{} in string",
                describe(b).replacen("character", "control character", 1)
            )),
            _ => Ok(Step::Take),
        }
    }

    fn number_byte(&mut self, b: u8, n: Num) -> Result<Step, String> {
        let next = match (n, b) {
            (Num::Minus, b'0') => Num::Zero,
            (Num::Minus, b'1'..=b'9') => Num::Int,
            (Num::Int, b'0'..=b'9') => Num::Int,
            (Num::Zero | Num::Int, b'.') => Num::Dot,
            (Num::Dot | Num::Frac, b'0'..=b'9') => Num::Frac,
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Num::Exp,
            (Num::Exp, b'+' | b'-') => Num::ExpSign,
            (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Num::ExpDigits,
            _ if n.complete() => return Ok(Step::EndRetry),
            _ => return Err(unexpected(b, "a digit")),
        };
        self.state = State::Num(next);
        Ok(Step::Take)
    }
}

/// Names byte `b` for an error text.
fn describe(b: u8) -> String {
    match b {
        b'\n' => "end of line".to_string(),
        b'\'' => "character \"'\"".to_string(),
        0x21..=0x7e => format!("character '{}'", b as char),
        b' ' => "character ' '".to_string(),
        0..=0x1f | 0x7f => format!("character 0x{b:02x}"),
        _ => format!("byte 0x{b:02x}"),
    }
}

fn unexpected(b: u8, expecting: &str) -> String {
    format!("unexpected {}, expecting {expecting}", describe(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode(input: &[u8]) -> Vec<Item> {
        let mut d = Decoder::new(1000);
        d.feed(input);
        std::iter::from_fn(|| d.next_item()).collect()
    }

    fn values(input: &[u8]) -> Vec<Value> {
        decode(input)
            .into_iter()
            .map(|i| match i {
                Item::Value(v) => v,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn error_text(item: &Item) -> &str {
        match item {
            Item::Error(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn one_object_per_line() {
        let v = values(b"{\"execute\": \"a\"}\r\n{\"execute\": \"b\", \"id\": 1}\n");
        assert_eq!(
            v,
            vec![json!({"execute": "a"}), json!({"execute": "b", "id": 1})]
        );
    }

    #[test]
    fn several_per_line_and_split_over_lines() {
        let v = values(b"{\"a\":1}{\"b\":[1,2]}  {\"c\":\n  {\"d\":\n\"e\"}\n}\n");
        assert_eq!(
            v,
            vec![
                json!({"a": 1}),
                json!({"b": [1, 2]}),
                json!({"c": {"d": "e"}})
            ]
        );
    }

    #[test]
    fn byte_by_byte_feeding() {
        let text = br#"{"execute":"x","arguments":{"s":"a\"}\\\u00e9","n":[-1.5e3,0,true,false,null]},"id":{"k":[]}}"#;
        let mut d = Decoder::new(1000);
        for b in text.iter() {
            assert_eq!(d.next_item(), None);
            d.feed(std::slice::from_ref(b));
        }
        assert_eq!(
            d.next_item(),
            Some(Item::Value(json!({
                "execute": "x",
                "arguments": {"s": "a\"}\\\u{e9}", "n": [-1500.0, 0, true, false, null]},
                "id": {"k": []}
            })))
        );
    }

    #[test]
    fn top_level_scalars_are_values() {
        // The session rejects them ("QMP input must be a JSON object").
        assert_eq!(
            values(b"123\n\"s\" true [1]\n"),
            vec![json!(123), json!("s"), json!(true), json!([1])]
        );
    }

    #[test]
    fn error_then_resync_at_next_line() {
        let items = decode(b"{\"execute\" \"x\", \"id\": 1} {\"a\": 1}\n{\"execute\":\"ok\"}\n");
        assert_eq!(items.len(), 2);
        assert_eq!(
            error_text(&items[0]),
            "JSON parse error, unexpected character '\"', expecting ':'"
        );
        assert_eq!(items[1], Item::Value(json!({"execute": "ok"})));
    }

    #[test]
    fn unterminated_line_is_an_error_at_its_end() {
        let items = decode(b"{\"execute\": \"x\n{\"execute\":\"ok\"}\n");
        assert_eq!(
            error_text(&items[0]),
            "JSON parse error, end of line in string"
        );
        assert_eq!(items[1], Item::Value(json!({"execute": "ok"})));
        let items = decode(b"{\"execute\": tru\n{\"execute\":\"ok\"}\n");
        assert_eq!(
            error_text(&items[0]),
            "JSON parse error, invalid literal, expecting 'true'"
        );
        assert_eq!(items[1], Item::Value(json!({"execute": "ok"})));
    }

    #[test]
    fn control_character_resets_an_unfinished_message() {
        let items = decode(b"{\"execute\": \n\x1b\n{\"execute\":\"ok\"}\n");
        assert_eq!(
            error_text(&items[0]),
            "JSON parse error, unexpected character 0x1b, expecting a value"
        );
        assert_eq!(items[1], Item::Value(json!({"execute": "ok"})));
    }

    #[test]
    fn garbage_and_binary() {
        let items = decode(b"hello world\n\xff\xfe\x00{}\n{}\n");
        assert_eq!(items.len(), 3);
        assert_eq!(
            error_text(&items[0]),
            "JSON parse error, unexpected character 'h', expecting a value"
        );
        assert_eq!(
            error_text(&items[1]),
            "JSON parse error, unexpected byte 0xff, expecting a value"
        );
        assert_eq!(items[2], Item::Value(json!({})));
    }

    #[test]
    fn invalid_utf8_in_string_is_caught_by_serde() {
        let items = decode(b"{\"a\": \"\xc3\x28\"}\n{}\n");
        assert!(
            error_text(&items[0]).starts_with("JSON parse error, "),
            "{items:?}"
        );
        assert_eq!(items[1], Item::Value(json!({})));
    }

    #[test]
    fn mismatched_brackets_and_bad_numbers() {
        for bad in [
            &b"{\"a\": [1}\n"[..],
            b"{\"a\": 1]\n",
            b"{\"a\": 01}\n",
            b"{\"a\": -}\n",
            b"{\"a\": 1.}\n",
            b"{\"a\": 1e}\n",
            b"{\"a\": \"\\x\"}\n",
            b"{\"a\": \"\\u12g4\"}\n",
            b"{1: 2}\n",
            b"{\"a\" 1}\n",
            b"{\"a\": 1,}\n",
            b"[1,]\n",
            b"{'a': 1}\n",
        ] {
            let items = decode(bad);
            assert_eq!(items.len(), 1, "{}", String::from_utf8_lossy(bad));
            error_text(&items[0]);
        }
    }

    #[test]
    fn numbers_end_at_delimiters() {
        assert_eq!(
            values(b"{\"a\":[0,-0.5,12E+2,3e-1 ]}"),
            vec![json!({"a": [0, -0.5, 1200.0, 0.3]})]
        );
    }

    #[test]
    fn nesting_limit() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(values(ok.as_bytes()).len(), 1);
        let deep = format!(
            "{}{}\n{{}}\n",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        let mut d = Decoder::new(10_000);
        d.feed(deep.as_bytes());
        let items: Vec<_> = std::iter::from_fn(|| d.next_item()).collect();
        assert_eq!(error_text(&items[0]), "JSON parse error, nesting too deep");
        assert_eq!(items[1], Item::Value(json!({})));
    }

    #[test]
    fn size_limit_kills_the_decoder() {
        let mut d = Decoder::new(10);
        d.feed(b"  {\"a\": 12}\n");
        assert_eq!(d.next_item(), Some(Item::Value(json!({"a": 12}))));
        d.feed(b"{\"a\": 1234}\n{}\n");
        assert_eq!(d.next_item(), Some(Item::TooLarge));
        assert_eq!(d.next_item(), None);
    }
}
