//! QAPI types as data, and `query-qmp-schema`: the introspection answer
//! (QEMU's SchemaInfo list) built from the command table, the events and
//! the driver table.
//!
//! Types are named as QEMU names them on the wire: builtins by their name
//! (`str`, `int`, ...), arrays as `[ELEMENT]`, every other type by a number
//! given in the order the walk first meets it.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{json, Value};

/// A type of an argument, a member or a return value.
#[derive(Clone, Copy)]
pub(crate) enum Ty {
    /// A JSON string.
    Str,
    /// A JSON integer.
    Int,
    /// A JSON boolean.
    Bool,
    /// Any JSON value.
    Any,
    /// An enumeration.
    Enum(&'static Enum),
    /// A list of the element type.
    Array(&'static Ty),
    /// An object (a struct, or a flat union).
    Object(&'static Object),
    /// One of several types, told apart by their JSON type.
    Alternate(&'static Alternate),
}

/// An enumeration type.
pub(crate) struct Enum {
    /// Its QAPI name (for the tests and the docs; masked on the wire).
    pub(crate) name: &'static str,
    /// Its values.
    pub(crate) values: Values,
}

/// The values of an enumeration.
pub(crate) enum Values {
    /// A fixed list.
    List(&'static [&'static str]),
    /// The driver table's names (BlockdevDriver).
    Drivers,
    /// The transaction actions of the command table.
    Actions,
}

/// An object type; with `union`, a flat union whose tag is one of the
/// members.
pub(crate) struct Object {
    /// Its QAPI name.
    pub(crate) name: &'static str,
    /// The members every variant has.
    pub(crate) members: &'static [Member],
    /// The variants, for a flat union.
    pub(crate) union: Option<Union>,
}

/// A flat union's variants.
pub(crate) struct Union {
    /// The member whose value selects the variant (an enum member).
    pub(crate) tag: &'static str,
    /// The variants.
    pub(crate) cases: Cases,
}

/// Where a union's variants come from.
pub(crate) enum Cases {
    /// A fixed list: the tag value and the variant's own members.
    List(&'static [(&'static str, &'static Object)]),
    /// One per driver of the driver table (BlockdevOptions): its options.
    Drivers,
    /// One per transaction action of the command table:
    /// `{"data": ARGS}`.
    Actions,
}

/// A member of an object.
pub(crate) struct Member {
    /// Its name.
    pub(crate) name: &'static str,
    /// Its type.
    pub(crate) ty: Ty,
    /// Whether it may be left out.
    pub(crate) optional: bool,
}

/// A mandatory member.
pub(crate) const fn req(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: false,
    }
}

/// An optional member.
pub(crate) const fn opt(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: true,
    }
}

/// An object type without variants.
pub(crate) const fn object(name: &'static str, members: &'static [Member]) -> Object {
    Object {
        name,
        members,
        union: None,
    }
}

/// An enumeration with a fixed list of values.
pub(crate) const fn enumeration(name: &'static str, values: &'static [&'static str]) -> Enum {
    Enum {
        name,
        values: Values::List(values),
    }
}

/// An alternate type.
pub(crate) struct Alternate {
    /// Its QAPI name.
    pub(crate) name: &'static str,
    /// The types it may be; each of a different JSON type.
    pub(crate) types: &'static [Ty],
}

/// An event and its data.
pub(crate) struct EventDef {
    /// The event name.
    pub(crate) name: &'static str,
    /// Its `data` member.
    pub(crate) data: &'static Object,
}

/// The empty object: no arguments, or `{}` returned.
pub(crate) static EMPTY: Object = object("q_empty", &[]);

/// A command as introspection shows it.
pub(crate) struct CommandShape {
    /// The command name.
    pub(crate) name: &'static str,
    /// Its arguments.
    pub(crate) args: &'static Object,
    /// What it returns.
    pub(crate) returns: Ty,
}

/// A name and the object that goes with it: a driver and its options, a
/// transaction action and its arguments.
pub(crate) type Case = (&'static str, &'static Object);

/// A type still to describe.
#[derive(Clone, Copy)]
enum Pending {
    Ty(Ty),
    /// `{"data": ARGS}` of a transaction action.
    Wrapper(&'static Object),
}

/// Builds the SchemaInfo list.
pub(crate) struct Introspection {
    /// Assigned names, by QAPI name.
    names: BTreeMap<String, String>,
    /// Types named but not yet described.
    pending: VecDeque<Pending>,
    out: Vec<Value>,
    drivers: Vec<Case>,
    actions: Vec<Case>,
}

impl Introspection {
    /// A walk with these drivers and transaction actions.
    pub(crate) fn new(drivers: Vec<Case>, actions: Vec<Case>) -> Self {
        Introspection {
            names: BTreeMap::new(),
            pending: VecDeque::new(),
            out: Vec::new(),
            drivers,
            actions,
        }
    }

    /// The SchemaInfo list of `commands` and `events`, and every type they
    /// use, each described once.
    pub(crate) fn run(mut self, commands: &[CommandShape], events: &[EventDef]) -> Value {
        for c in commands {
            let arg = self.name_of(Ty::Object(c.args));
            let ret = self.name_of(c.returns);
            self.out.push(json!({
                "name": c.name, "meta-type": "command", "arg-type": arg, "ret-type": ret,
            }));
        }
        for e in events {
            let arg = self.name_of(Ty::Object(e.data));
            self.out
                .push(json!({"name": e.name, "meta-type": "event", "arg-type": arg}));
        }
        while let Some(item) = self.pending.pop_front() {
            let info = match item {
                Pending::Ty(ty) => self.describe(ty),
                Pending::Wrapper(args) => {
                    let name = self.wrapper_name(args);
                    let data = self.name_of(Ty::Object(args));
                    json!({"name": name, "meta-type": "object",
                           "members": [{"name": "data", "type": data}]})
                }
            };
            self.out.push(info);
        }
        for (name, json_type) in [
            ("str", "string"),
            ("int", "int"),
            ("bool", "boolean"),
            ("any", "value"),
        ] {
            self.out
                .push(json!({"name": name, "meta-type": "builtin", "json-type": json_type}));
        }
        Value::Array(self.out)
    }

    /// The wire name of `ty`; a type met for the first time is queued to
    /// be described.
    fn name_of(&mut self, ty: Ty) -> String {
        let key = match ty {
            Ty::Str => return "str".into(),
            Ty::Int => return "int".into(),
            Ty::Bool => return "bool".into(),
            Ty::Any => return "any".into(),
            Ty::Enum(e) => e.name.to_string(),
            Ty::Object(o) => o.name.to_string(),
            Ty::Alternate(a) => a.name.to_string(),
            Ty::Array(element) => format!("[{}]", self.qapi_name(*element)),
        };
        if let Some(name) = self.names.get(&key) {
            return name.clone();
        }
        let name = match ty {
            Ty::Array(element) => format!("[{}]", self.name_of(*element)),
            _ => self.names.len().to_string(),
        };
        self.names.insert(key, name.clone());
        self.pending.push_back(Pending::Ty(ty));
        name
    }

    /// The wire name of the wrapper of a transaction action's arguments.
    fn wrapper_name(&mut self, args: &'static Object) -> String {
        let key = format!("wrapper {}", args.name);
        if let Some(name) = self.names.get(&key) {
            return name.clone();
        }
        let name = self.names.len().to_string();
        self.names.insert(key, name.clone());
        self.pending.push_back(Pending::Wrapper(args));
        name
    }

    /// The QAPI name of a type, the key of [`Introspection::names`].
    fn qapi_name(&self, ty: Ty) -> String {
        match ty {
            Ty::Str => "str".into(),
            Ty::Int => "int".into(),
            Ty::Bool => "bool".into(),
            Ty::Any => "any".into(),
            Ty::Enum(e) => e.name.into(),
            Ty::Object(o) => o.name.into(),
            Ty::Alternate(a) => a.name.into(),
            Ty::Array(element) => format!("[{}]", self.qapi_name(*element)),
        }
    }

    fn describe(&mut self, ty: Ty) -> Value {
        let name = self.name_of(ty);
        match ty {
            Ty::Enum(e) => {
                let values: Vec<&str> = match &e.values {
                    Values::List(list) => list.to_vec(),
                    Values::Drivers => self.drivers.iter().map(|c| c.0).collect(),
                    Values::Actions => self.actions.iter().map(|c| c.0).collect(),
                };
                let members: Vec<Value> = values.iter().map(|v| json!({"name": v})).collect();
                json!({"name": name, "meta-type": "enum", "members": members, "values": values})
            }
            Ty::Array(element) => {
                let element = self.name_of(*element);
                json!({"name": name, "meta-type": "array", "element-type": element})
            }
            Ty::Alternate(a) => {
                let members: Vec<Value> = a
                    .types
                    .iter()
                    .map(|t| json!({"type": self.name_of(*t)}))
                    .collect();
                json!({"name": name, "meta-type": "alternate", "members": members})
            }
            Ty::Object(o) => self.describe_object(&name, o),
            Ty::Str | Ty::Int | Ty::Bool | Ty::Any => {
                unreachable!("builtins are listed, not queued")
            }
        }
    }

    fn members(&mut self, members: &[Member]) -> Vec<Value> {
        members
            .iter()
            .map(|m| {
                let mut v = json!({"name": m.name, "type": self.name_of(m.ty)});
                if m.optional {
                    v["default"] = Value::Null;
                }
                v
            })
            .collect()
    }

    fn describe_object(&mut self, name: &str, o: &Object) -> Value {
        let members = self.members(o.members);
        let mut info = json!({"name": name, "meta-type": "object", "members": members});
        if let Some(union) = &o.union {
            let variants: Vec<Value> = match &union.cases {
                Cases::List(list) => list
                    .iter()
                    .map(|(case, o)| json!({"case": case, "type": self.name_of(Ty::Object(o))}))
                    .collect(),
                Cases::Drivers => self
                    .drivers
                    .clone()
                    .into_iter()
                    .map(|(case, o)| json!({"case": case, "type": self.name_of(Ty::Object(o))}))
                    .collect(),
                Cases::Actions => self
                    .actions
                    .clone()
                    .into_iter()
                    .map(|(case, o)| json!({"case": case, "type": self.wrapper_name(o)}))
                    .collect(),
            };
            info["tag"] = json!(union.tag);
            info["variants"] = json!(variants);
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static COLOR: Enum = enumeration("Color", &["red", "blue"]);
    static RED: Object = object("Red", &[opt("shade", Ty::Int)]);
    static BLUE: Object = object("Blue", &[]);
    static PAINT: Object = Object {
        name: "Paint",
        members: &[
            req("color", Ty::Enum(&COLOR)),
            opt("tags", Ty::Array(&Ty::Str)),
        ],
        union: Some(Union {
            tag: "color",
            cases: Cases::List(&[("red", &RED), ("blue", &BLUE)]),
        }),
    };

    const PAINTS: Ty = Ty::Array(&Ty::Object(&PAINT));

    #[test]
    fn types_are_described_once_and_referenced_by_name() {
        let schema = Introspection::new(vec![], vec![]).run(
            &[
                CommandShape {
                    name: "paint",
                    args: &PAINT,
                    returns: Ty::Object(&EMPTY),
                },
                CommandShape {
                    name: "repaint",
                    args: &PAINT,
                    returns: PAINTS,
                },
            ],
            &[],
        );
        let list = schema.as_array().unwrap();
        let by_name: BTreeMap<&str, &Value> = list
            .iter()
            .map(|e| (e["name"].as_str().unwrap(), e))
            .collect();
        assert_eq!(by_name.len(), list.len(), "a name is described twice");
        let paint = by_name["paint"]["arg-type"].as_str().unwrap();
        assert_eq!(by_name["repaint"]["arg-type"], paint);
        assert_eq!(by_name["repaint"]["ret-type"], format!("[{paint}]"));
        let union = by_name[paint];
        assert_eq!(union["tag"], "color");
        assert_eq!(union["variants"].as_array().unwrap().len(), 2);
        assert_eq!(union["members"][1]["default"], Value::Null);
        assert_eq!(by_name["[str]"]["element-type"], "str");
        assert_eq!(by_name["str"]["json-type"], "string");
    }
}
