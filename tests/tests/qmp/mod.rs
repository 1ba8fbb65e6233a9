//! Running QMP commands in tests, shared by several test binaries.

use blkgraph_ctl::{ClientError, QmpClient};
use serde_json::Value;

/// Runs `cmd` with the object `args`; a QMP error becomes its description,
/// anything else (a broken connection) fails the test.
pub fn exec(qmp: &mut QmpClient, cmd: &str, args: Value) -> Result<Value, String> {
    let Value::Object(map) = args else {
        panic!("{cmd}: arguments must be an object")
    };
    qmp.execute(cmd, map).map_err(|e| match e {
        ClientError::Qmp(q) => q.desc,
        other => panic!("{cmd}: {other:?}"),
    })
}
