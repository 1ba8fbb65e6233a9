//! Renders `x-debug-query-block-graph`'s reply (QEMU's XDbgBlockGraph) as
//! Graphviz dot.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

use crate::top::Rates;

/// Figures for the edges (`graph --stats`): by export id, and by node name.
pub struct EdgeRates {
    /// The traffic of each export.
    pub exports: BTreeMap<String, Rates>,
    /// The traffic that reaches each node.
    pub nodes: BTreeMap<String, Rates>,
}

/// Short names for permissions, in edge labels.
const PERM_ABBREV: [(&str, &str); 5] = [
    ("consistent-read", "R"),
    ("write", "W"),
    ("write-unchanged", "U"),
    ("resize", "S"),
    ("graph-mod", "G"),
];

/// Renders `{"nodes": [{"id", "type", "name"}], "edges": [{"parent",
/// "child", "name", "perm", "shared-perm"}]}` as a dot digraph: nodes
/// labelled with type and name, edges from parent to child labelled with
/// the child's role, the permissions taken and those shared
/// (`R` consistent-read, `W` write, `U` write-unchanged, `S` resize,
/// `G` graph-mod). With `rates`, an edge from an export carries the
/// export's figures, and an edge into a node the node's.
pub fn render(graph: &Value, rates: Option<&EdgeRates>) -> Result<String, String> {
    let nodes = list(graph, "nodes")?;
    let edges = list(graph, "edges")?;
    let mut out = String::from("digraph blkgraph {\n    node [shape=box];\n");
    for node in nodes {
        let id = member(node, "id")?;
        let kind = text(node, "type")?;
        let name = text(node, "name")?;
        // blkgraph's reply also names the driver of a driver node.
        let driver = node.get("__org.blkgraph_driver").and_then(Value::as_str);
        let label = match (name.is_empty(), driver) {
            (true, _) => kind.to_string(),
            (false, Some(driver)) => format!("{driver}\n{name}"),
            (false, None) => format!("{kind}\n{name}"),
        };
        let shape = match kind {
            "block-driver" => ", shape=ellipse",
            "block-export" => ", shape=cds",
            _ => "",
        };
        let _ = writeln!(
            out,
            "    {} [label={}{shape}];",
            quote(&id.to_string()),
            quote(&label)
        );
    }
    let by_id = |id: &Value| nodes.iter().find(|n| n.get("id") == Some(id));
    for edge in edges {
        let parent = member(edge, "parent")?;
        let child = member(edge, "child")?;
        let role = text(edge, "name")?;
        let perm = perms(edge, "perm")?;
        let shared = perms(edge, "shared-perm")?;
        let mut label = format!("{role}\n{perm} / shared: {shared}");
        if let Some(rates) = rates {
            let name = |n: Option<&Value>| {
                n.and_then(|n| n.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let from = by_id(parent);
            let figures = if from.and_then(|n| n.get("type")) == Some(&Value::from("block-export"))
            {
                rates.exports.get(&name(from))
            } else {
                rates.nodes.get(&name(by_id(child)))
            };
            if let Some(r) = figures {
                label = format!("{label}\n{}", r.label());
            }
        }
        let _ = writeln!(
            out,
            "    {} -> {} [label={}];",
            quote(&parent.to_string()),
            quote(&child.to_string()),
            quote(&label)
        );
    }
    out.push_str("}\n");
    Ok(out)
}

fn member<'a>(object: &'a Value, key: &str) -> Result<&'a Value, String> {
    object
        .get(key)
        .ok_or_else(|| format!("'{key}' missing in {object}"))
}

fn list<'a>(object: &'a Value, key: &str) -> Result<&'a Vec<Value>, String> {
    member(object, key)?
        .as_array()
        .ok_or_else(|| format!("'{key}' is not an array"))
}

fn text<'a>(object: &'a Value, key: &str) -> Result<&'a str, String> {
    member(object, key)?
        .as_str()
        .ok_or_else(|| format!("'{key}' is not a string in {object}"))
}

/// Abbreviates a permission list, keeping the server's order.
fn perms(edge: &Value, key: &str) -> Result<String, String> {
    let names = list(edge, key)?;
    if names.is_empty() {
        return Ok("-".to_string());
    }
    let mut short = Vec::with_capacity(names.len());
    for name in names {
        let name = name
            .as_str()
            .ok_or_else(|| format!("'{key}' has a non-string member in {edge}"))?;
        let abbrev = PERM_ABBREV
            .iter()
            .find(|(long, _)| *long == name)
            .map_or(name, |(_, s)| s);
        short.push(abbrev);
    }
    Ok(short.join(" "))
}

/// A dot double-quoted string; `\n` in `s` becomes dot's line break.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_nodes_and_edges() {
        let graph = json!({
            "nodes": [
                {"id": 1, "type": "block-export", "name": "vub0"},
                {"id": 2, "type": "block-driver", "name": "raw disk0"},
                {"id": 3, "type": "block-driver", "name": "f0", "__org.blkgraph_driver": "file"},
                {"id": 4, "type": "block-backend", "name": ""},
            ],
            "edges": [
                {"parent": 1, "child": 2, "name": "root",
                 "perm": ["consistent-read", "write"], "shared-perm": ["consistent-read", "write", "write-unchanged", "resize"]},
                {"parent": 2, "child": 3, "name": "file",
                 "perm": ["write", "consistent-read", "new-perm"], "shared-perm": []},
            ]
        });
        assert_eq!(
            render(&graph, None).unwrap(),
            r#"digraph blkgraph {
    node [shape=box];
    "1" [label="block-export\nvub0", shape=cds];
    "2" [label="block-driver\nraw disk0", shape=ellipse];
    "3" [label="file\nf0", shape=ellipse];
    "4" [label="block-backend"];
    "1" -> "2" [label="root\nR W / shared: R W U S"];
    "2" -> "3" [label="file\nW R new-perm / shared: -"];
}
"#
        );
    }

    #[test]
    fn quotes_names() {
        let graph = json!({
            "nodes": [{"id": 0, "type": "block-driver", "name": "a\"b\\c\nd"}],
            "edges": []
        });
        let dot = render(&graph, None).unwrap();
        assert!(
            dot.contains(r#""0" [label="block-driver\na\"b\\c\nd", shape=ellipse];"#),
            "{dot}"
        );
    }

    #[test]
    fn malformed_replies() {
        assert_eq!(
            render(&json!({}), None).unwrap_err(),
            "'nodes' missing in {}"
        );
        assert_eq!(
            render(&json!({"nodes": {}, "edges": []}), None).unwrap_err(),
            "'nodes' is not an array"
        );
        let e = render(
            &json!({"nodes": [{"id": 1, "type": 2, "name": ""}], "edges": []}),
            None,
        )
        .unwrap_err();
        assert!(e.starts_with("'type' is not a string"), "{e}");
        let e = render(
            &json!({"nodes": [], "edges": [
            {"parent": 1, "child": 2, "name": "file", "perm": [1], "shared-perm": []}]}),
            None,
        )
        .unwrap_err();
        assert!(e.starts_with("'perm' has a non-string member"), "{e}");
    }
}
