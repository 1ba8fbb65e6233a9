//! The QAPI types of blkgraph's commands, their results and its events,
//! as data for `query-qmp-schema` (named as in QEMU's qapi/*.json; members
//! blkgraph does not have are left out, extensions are prefixed `x-` or
//! `__org.blkgraph_`).

use super::schema::{
    enumeration, object, opt, req, Alternate, Cases, Enum, EventDef, Object, Ty, Union, Values,
};

const STR: Ty = Ty::Str;
const INT: Ty = Ty::Int;
const BOOL: Ty = Ty::Bool;
const ANY: Ty = Ty::Any;

// Protocol commands (answered by the QMP session).

static QMP_CAPABILITY: Enum = enumeration("QMPCapability", &["oob"]);
pub(super) static QMP_CAPABILITIES_ARGS: Object = object(
    "q_obj_qmp_capabilities-arg",
    &[opt("enable", Ty::Array(&Ty::Enum(&QMP_CAPABILITY)))],
);
static COMMAND_INFO: Object = object("CommandInfo", &[req("name", STR)]);
pub(super) const COMMAND_INFO_LIST: Ty = Ty::Array(&Ty::Object(&COMMAND_INFO));
pub(super) static FDNAME_ARGS: Object = object("q_obj_getfd-arg", &[req("fdname", STR)]);

// Introspection.

static SCHEMA_META_TYPE: Enum = enumeration(
    "SchemaMetaType",
    &[
        "builtin",
        "enum",
        "array",
        "object",
        "alternate",
        "command",
        "event",
    ],
);
static JSON_TYPE: Enum = enumeration(
    "JSONType",
    &[
        "string", "number", "int", "boolean", "null", "object", "array", "value",
    ],
);
static SCHEMA_BUILTIN: Object = object(
    "SchemaInfoBuiltin",
    &[req("json-type", Ty::Enum(&JSON_TYPE))],
);
static SCHEMA_ENUM_MEMBER: Object = object(
    "SchemaInfoEnumMember",
    &[req("name", STR), opt("features", Ty::Array(&STR))],
);
static SCHEMA_ENUM: Object = object(
    "SchemaInfoEnum",
    &[
        req("members", Ty::Array(&Ty::Object(&SCHEMA_ENUM_MEMBER))),
        opt("values", Ty::Array(&STR)),
    ],
);
static SCHEMA_ARRAY: Object = object("SchemaInfoArray", &[req("element-type", STR)]);
static SCHEMA_OBJECT_MEMBER: Object = object(
    "SchemaInfoObjectMember",
    &[
        req("name", STR),
        req("type", STR),
        opt("default", ANY),
        opt("features", Ty::Array(&STR)),
    ],
);
static SCHEMA_OBJECT_VARIANT: Object = object(
    "SchemaInfoObjectVariant",
    &[req("case", STR), req("type", STR)],
);
static SCHEMA_OBJECT: Object = object(
    "SchemaInfoObject",
    &[
        req("members", Ty::Array(&Ty::Object(&SCHEMA_OBJECT_MEMBER))),
        opt("tag", STR),
        opt("variants", Ty::Array(&Ty::Object(&SCHEMA_OBJECT_VARIANT))),
    ],
);
static SCHEMA_ALTERNATE_MEMBER: Object = object("SchemaInfoAlternateMember", &[req("type", STR)]);
static SCHEMA_ALTERNATE: Object = object(
    "SchemaInfoAlternate",
    &[req(
        "members",
        Ty::Array(&Ty::Object(&SCHEMA_ALTERNATE_MEMBER)),
    )],
);
static SCHEMA_COMMAND: Object = object(
    "SchemaInfoCommand",
    &[
        req("arg-type", STR),
        req("ret-type", STR),
        opt("allow-oob", BOOL),
    ],
);
static SCHEMA_EVENT: Object = object("SchemaInfoEvent", &[req("arg-type", STR)]);
static SCHEMA_INFO: Object = Object {
    name: "SchemaInfo",
    members: &[
        req("name", STR),
        req("meta-type", Ty::Enum(&SCHEMA_META_TYPE)),
        opt("features", Ty::Array(&STR)),
    ],
    union: Some(Union {
        tag: "meta-type",
        cases: Cases::List(&[
            ("builtin", &SCHEMA_BUILTIN),
            ("enum", &SCHEMA_ENUM),
            ("array", &SCHEMA_ARRAY),
            ("object", &SCHEMA_OBJECT),
            ("alternate", &SCHEMA_ALTERNATE),
            ("command", &SCHEMA_COMMAND),
            ("event", &SCHEMA_EVENT),
        ]),
    }),
};
pub(super) const SCHEMA_INFO_LIST: Ty = Ty::Array(&Ty::Object(&SCHEMA_INFO));

// query-version.

static VERSION_TRIPLE: Object = object(
    "VersionTriple",
    &[req("major", INT), req("minor", INT), req("micro", INT)],
);
static VERSION_INFO: Object = object(
    "VersionInfo",
    &[
        req("qemu", Ty::Object(&VERSION_TRIPLE)),
        req("package", STR),
    ],
);
pub(super) const VERSION: Ty = Ty::Object(&VERSION_INFO);

// Nodes: blockdev-add and the drivers' options.

static BLOCKDEV_DRIVER: Enum = Enum {
    name: "BlockdevDriver",
    values: Values::Drivers,
};
static DISCARD: Enum = enumeration("BlockdevDiscardOptions", &["ignore", "unmap"]);
static DETECT_ZEROES: Enum = enumeration("BlockdevDetectZeroesOptions", &["off", "on", "unmap"]);
static CACHE: Object = object(
    "BlockdevCacheOptions",
    &[opt("direct", BOOL), opt("no-flush", BOOL)],
);
/// A child given inline or by node-name (BlockdevRef).
static BLOCKDEV_REF: Alternate = Alternate {
    name: "BlockdevRef",
    types: &[Ty::Object(&BLOCKDEV_OPTIONS), STR],
};
const CHILD: Ty = Ty::Alternate(&BLOCKDEV_REF);
/// BlockdevOptions: the common members, then the driver's own.
pub(super) static BLOCKDEV_OPTIONS: Object = Object {
    name: "BlockdevOptions",
    members: &[
        req("driver", Ty::Enum(&BLOCKDEV_DRIVER)),
        opt("node-name", STR),
        opt("discard", Ty::Enum(&DISCARD)),
        opt("cache", Ty::Object(&CACHE)),
        opt("read-only", BOOL),
        opt("auto-read-only", BOOL),
        opt("force-share", BOOL),
        opt("detect-zeroes", Ty::Enum(&DETECT_ZEROES)),
    ],
    union: Some(Union {
        tag: "driver",
        cases: Cases::Drivers,
    }),
};

static FILE_AIO: Enum = enumeration("BlockdevAioOptions", &["threads", "native", "io_uring"]);
static ON_OFF_AUTO: Enum = enumeration("OnOffAuto", &["auto", "on", "off"]);
static FILE_OPTIONS: Object = object(
    "BlockdevOptionsFile",
    &[
        req("filename", STR),
        opt("aio", Ty::Enum(&FILE_AIO)),
        opt("locking", Ty::Enum(&ON_OFF_AUTO)),
        opt("aio-max-batch", INT),
    ],
);
static RAW_OPTIONS: Object = object(
    "BlockdevOptionsRaw",
    &[req("file", CHILD), opt("offset", INT), opt("size", INT)],
);
static NULL_OPTIONS: Object = object(
    "BlockdevOptionsNull",
    &[opt("size", INT), opt("read-zeroes", BOOL)],
);
static QCOW2_OPTIONS: Object = object(
    "BlockdevOptionsQcow2",
    &[
        req("file", CHILD),
        opt("backing", Ty::Alternate(&BLOCKDEV_REF_OR_NULL)),
        opt("lazy-refcounts", BOOL),
        opt("pass-discard-request", BOOL),
        opt("pass-discard-snapshot", BOOL),
        opt("pass-discard-other", BOOL),
        opt("discard-no-unref", BOOL),
        opt("overlap-check", ANY),
        opt("cache-size", INT),
        opt("l2-cache-size", INT),
        opt("l2-cache-entry-size", INT),
        opt("refcount-cache-size", INT),
        opt("cache-clean-interval", INT),
    ],
);
/// `backing: null` opens no backing file.
static BLOCKDEV_REF_OR_NULL: Alternate = Alternate {
    name: "BlockdevRefOrNull",
    types: &[Ty::Object(&BLOCKDEV_OPTIONS), STR, Ty::Any],
};
static THROTTLE_OPTIONS: Object = object(
    "BlockdevOptionsThrottle",
    &[
        req("file", CHILD),
        opt("throttle-group", STR),
        opt("limits", Ty::Object(&THROTTLE_LIMITS)),
    ],
);
static ON_CBW_ERROR: Enum = enumeration("OnCbwError", &["break-guest-write", "break-snapshot"]);
static CBW_OPTIONS: Object = object(
    "BlockdevOptionsCbw",
    &[
        req("file", CHILD),
        req("target", CHILD),
        opt("bitmap", Ty::Object(&BLOCK_DIRTY_BITMAP)),
        opt("on-cbw-error", Ty::Enum(&ON_CBW_ERROR)),
        opt("cbw-timeout", INT),
        opt("min-cluster-size", INT),
    ],
);
static SNAPSHOT_ACCESS_OPTIONS: Object =
    object("BlockdevOptionsGenericFormat", &[req("file", CHILD)]);
static RBD_OPTIONS: Object = object(
    "BlockdevOptionsRbd",
    &[
        req("pool", STR),
        opt("namespace", STR),
        req("image", STR),
        opt("conf", STR),
        opt("snapshot", STR),
        opt("user", STR),
        opt("key-secret", STR),
    ],
);
/// The NBD server of an `nbd` node: QEMU's SocketAddress, of the types
/// the driver connects to.
static NBD_SERVER_TYPE: Enum = enumeration("NbdServerAddressType", &["inet", "unix"]);
static NBD_SERVER: Object = Object {
    name: "NbdServerAddress",
    members: &[req("type", Ty::Enum(&NBD_SERVER_TYPE))],
    union: Some(Union {
        tag: "type",
        cases: Cases::List(&[("inet", &INET_ADDRESS), ("unix", &UNIX_ADDRESS)]),
    }),
};
static NBD_OPTIONS: Object = object(
    "BlockdevOptionsNbd",
    &[
        req("server", Ty::Object(&NBD_SERVER)),
        opt("export", STR),
        opt("tls-creds", STR),
        opt("tls-hostname", STR),
        opt("x-dirty-bitmap", STR),
        opt("reconnect-delay", INT),
        opt("open-timeout", INT),
    ],
);

/// The options of each driver of the driver table: its variant of
/// BlockdevOptions.
pub(super) fn driver_options(driver: &str) -> Option<&'static Object> {
    Some(match driver {
        "file" => &FILE_OPTIONS,
        "raw" => &RAW_OPTIONS,
        "null-co" => &NULL_OPTIONS,
        "qcow2" => &QCOW2_OPTIONS,
        "throttle" => &THROTTLE_OPTIONS,
        "copy-before-write" => &CBW_OPTIONS,
        "snapshot-access" => &SNAPSHOT_ACCESS_OPTIONS,
        "rbd" => &RBD_OPTIONS,
        "nbd" => &NBD_OPTIONS,
        _ => return None,
    })
}

pub(super) static REOPEN_ARGS: Object = object(
    "q_obj_blockdev-reopen-arg",
    &[req("options", Ty::Array(&Ty::Object(&BLOCKDEV_OPTIONS)))],
);

pub(super) static NODE_NAME_ARGS: Object =
    object("q_obj_blockdev-del-arg", &[req("node-name", STR)]);
static REPLACE_PARENT: Enum = enumeration("BlockParentType", &["export", "driver"]);
pub(super) static REPLACE_ARGS: Object = object(
    "BlockdevReplace",
    &[
        req("parent-type", Ty::Enum(&REPLACE_PARENT)),
        opt("export-id", STR),
        opt("node-name", STR),
        opt("child", STR),
        req("new-child", STR),
    ],
);
pub(super) static BLOCKDEV_SNAPSHOT_ARGS: Object =
    object("BlockdevSnapshot", &[req("node", STR), req("overlay", STR)]);
static NEW_IMAGE_MODE: Enum = enumeration("NewImageMode", &["existing", "absolute-paths"]);
pub(super) static BLOCKDEV_SNAPSHOT_SYNC_ARGS: Object = object(
    "BlockdevSnapshotSync",
    &[
        opt("device", STR),
        opt("node-name", STR),
        req("snapshot-file", STR),
        opt("snapshot-node-name", STR),
        opt("format", STR),
        opt("mode", Ty::Enum(&NEW_IMAGE_MODE)),
    ],
);
pub(super) static BLOCK_RESIZE_ARGS: Object = object(
    "q_obj_block_resize-arg",
    &[opt("device", STR), opt("node-name", STR), req("size", INT)],
);
pub(super) static WRITE_THRESHOLD_ARGS: Object = object(
    "q_obj_block-set-write-threshold-arg",
    &[req("node-name", STR), req("write-threshold", INT)],
);

// Transactions.

static COMPLETION_MODE: Enum = enumeration("ActionCompletionMode", &["individual", "grouped"]);
static TRANSACTION_PROPERTIES: Object = object(
    "TransactionProperties",
    &[opt("completion-mode", Ty::Enum(&COMPLETION_MODE))],
);
pub(super) static TRANSACTION_ARGS: Object = object(
    "q_obj_transaction-arg",
    &[
        req("actions", Ty::Array(&Ty::Object(&TRANSACTION_ACTION))),
        opt("properties", Ty::Object(&TRANSACTION_PROPERTIES)),
    ],
);
static ACTION_KIND: Enum = Enum {
    name: "TransactionActionKind",
    values: Values::Actions,
};
/// `{"type": ACTION, "data": ARGS}`, one variant per transaction action
/// of the command table.
pub(super) static TRANSACTION_ACTION: Object = Object {
    name: "TransactionAction",
    members: &[req("type", Ty::Enum(&ACTION_KIND))],
    union: Some(Union {
        tag: "type",
        cases: Cases::Actions,
    }),
};

// Dirty bitmaps.

pub(super) static BLOCK_DIRTY_BITMAP: Object =
    object("BlockDirtyBitmap", &[req("node", STR), req("name", STR)]);
pub(super) static BITMAP_ADD_ARGS: Object = object(
    "BlockDirtyBitmapAdd",
    &[
        req("node", STR),
        req("name", STR),
        opt("granularity", INT),
        opt("persistent", BOOL),
        opt("disabled", BOOL),
    ],
);
static BITMAP_OR_STR: Alternate = Alternate {
    name: "BlockDirtyBitmapOrStr",
    types: &[STR, Ty::Object(&BLOCK_DIRTY_BITMAP)],
};
pub(super) static BITMAP_MERGE_ARGS: Object = object(
    "BlockDirtyBitmapMerge",
    &[
        req("node", STR),
        req("target", STR),
        req("bitmaps", Ty::Array(&Ty::Alternate(&BITMAP_OR_STR))),
    ],
);

// Queries of nodes.

pub(super) static QUERY_NODES_ARGS: Object =
    object("q_obj_query-named-block-nodes-arg", &[opt("flat", BOOL)]);
static CACHE_INFO: Object = object(
    "BlockdevCacheInfo",
    &[
        req("writeback", BOOL),
        req("direct", BOOL),
        req("no-flush", BOOL),
    ],
);
static IMAGE_INFO: Object = object(
    "ImageInfo",
    &[
        req("filename", STR),
        req("format", STR),
        opt("dirty-flag", BOOL),
        opt("actual-size", INT),
        req("virtual-size", INT),
        opt("cluster-size", INT),
        opt("backing-filename", STR),
        opt("full-backing-filename", STR),
        opt("backing-filename-format", STR),
        opt("backing-image", Ty::Object(&IMAGE_INFO)),
        opt("format-specific", ANY),
    ],
);
static BITMAP_INFO: Object = object(
    "BlockDirtyInfo",
    &[
        opt("name", STR),
        req("count", INT),
        req("granularity", INT),
        req("recording", BOOL),
        req("busy", BOOL),
        req("persistent", BOOL),
        opt("inconsistent", BOOL),
    ],
);
static BLOCK_DEVICE_INFO: Object = object(
    "BlockDeviceInfo",
    &[
        req("file", STR),
        opt("node-name", STR),
        req("ro", BOOL),
        req("drv", STR),
        opt("backing_file", STR),
        req("backing_file_depth", INT),
        req("active", BOOL),
        req("encrypted", BOOL),
        req("detect_zeroes", Ty::Enum(&DETECT_ZEROES)),
        req("bps", INT),
        req("bps_rd", INT),
        req("bps_wr", INT),
        req("iops", INT),
        req("iops_rd", INT),
        req("iops_wr", INT),
        req("image", Ty::Object(&IMAGE_INFO)),
        req("cache", Ty::Object(&CACHE_INFO)),
        req("write_threshold", INT),
        opt("dirty-bitmaps", Ty::Array(&Ty::Object(&BITMAP_INFO))),
        opt("__org.blkgraph_snapshot", ANY),
    ],
);
pub(super) const BLOCK_DEVICE_INFO_LIST: Ty = Ty::Array(&Ty::Object(&BLOCK_DEVICE_INFO));

static GRAPH_NODE_TYPE: Enum = enumeration(
    "XDbgBlockGraphNodeType",
    &["block-backend", "block-job", "block-driver", "block-export"],
);
static BLOCK_PERMISSION: Enum = enumeration(
    "BlockPermission",
    &["consistent-read", "write", "write-unchanged", "resize"],
);
static GRAPH_NODE: Object = object(
    "XDbgBlockGraphNode",
    &[
        req("id", INT),
        req("type", Ty::Enum(&GRAPH_NODE_TYPE)),
        req("name", STR),
        opt("__org.blkgraph_driver", STR),
    ],
);
static GRAPH_EDGE: Object = object(
    "XDbgBlockGraphEdge",
    &[
        req("parent", INT),
        req("child", INT),
        req("name", STR),
        req("perm", Ty::Array(&Ty::Enum(&BLOCK_PERMISSION))),
        req("shared-perm", Ty::Array(&Ty::Enum(&BLOCK_PERMISSION))),
    ],
);
static BLOCK_GRAPH: Object = object(
    "XDbgBlockGraph",
    &[
        req("nodes", Ty::Array(&Ty::Object(&GRAPH_NODE))),
        req("edges", Ty::Array(&Ty::Object(&GRAPH_EDGE))),
    ],
);
pub(super) const BLOCK_GRAPH_INFO: Ty = Ty::Object(&BLOCK_GRAPH);

// Statistics.

pub(super) static QUERY_BLOCKSTATS_ARGS: Object =
    object("q_obj_query-blockstats-arg", &[opt("query-nodes", BOOL)]);
static HISTOGRAM: Object = object(
    "BlockLatencyHistogramInfo",
    &[
        req("boundaries", Ty::Array(&INT)),
        req("bins", Ty::Array(&INT)),
    ],
);
/// Per-operation counters, as QEMU's BlockDeviceStats.
static DEVICE_STATS: Object = object(
    "BlockDeviceStats",
    &[
        req("rd_bytes", INT),
        req("wr_bytes", INT),
        req("zone_append_bytes", INT),
        req("unmap_bytes", INT),
        req("rd_operations", INT),
        req("wr_operations", INT),
        req("zone_append_operations", INT),
        req("flush_operations", INT),
        req("unmap_operations", INT),
        req("rd_total_time_ns", INT),
        req("wr_total_time_ns", INT),
        req("zone_append_total_time_ns", INT),
        req("flush_total_time_ns", INT),
        req("unmap_total_time_ns", INT),
        req("wr_highest_offset", INT),
        req("rd_merged", INT),
        req("wr_merged", INT),
        req("zone_append_merged", INT),
        req("unmap_merged", INT),
        opt("idle_time_ns", INT),
        req("failed_rd_operations", INT),
        req("failed_wr_operations", INT),
        req("failed_zone_append_operations", INT),
        req("failed_flush_operations", INT),
        req("failed_unmap_operations", INT),
        req("invalid_rd_operations", INT),
        req("invalid_wr_operations", INT),
        req("invalid_zone_append_operations", INT),
        req("invalid_flush_operations", INT),
        req("invalid_unmap_operations", INT),
        req("account_invalid", BOOL),
        req("account_failed", BOOL),
        req("timed_stats", Ty::Array(&ANY)),
        opt("rd_latency_histogram", Ty::Object(&HISTOGRAM)),
        opt("wr_latency_histogram", Ty::Object(&HISTOGRAM)),
        opt("zone_append_latency_histogram", Ty::Object(&HISTOGRAM)),
        opt("flush_latency_histogram", Ty::Object(&HISTOGRAM)),
    ],
);
static BLOCK_STATS: Object = object(
    "BlockStats",
    &[
        opt("device", STR),
        opt("qdev", STR),
        opt("node-name", STR),
        req("stats", Ty::Object(&DEVICE_STATS)),
        opt("parent", Ty::Object(&BLOCK_STATS)),
        opt("backing", Ty::Object(&BLOCK_STATS)),
    ],
);
pub(super) const BLOCK_STATS_LIST: Ty = Ty::Array(&Ty::Object(&BLOCK_STATS));
pub(super) static HISTOGRAM_SET_ARGS: Object = object(
    "q_obj_block-latency-histogram-set-arg",
    &[
        req("id", STR),
        opt("boundaries", Ty::Array(&INT)),
        opt("boundaries-read", Ty::Array(&INT)),
        opt("boundaries-write", Ty::Array(&INT)),
        opt("boundaries-zap", Ty::Array(&INT)),
        opt("boundaries-flush", Ty::Array(&INT)),
    ],
);

// Exports.

static EXPORT_TYPE: Enum = enumeration("BlockExportType", &["nbd", "vhost-user-blk"]);
static SOCKET_ADDRESS_TYPE: Enum =
    enumeration("SocketAddressType", &["inet", "unix", "vsock", "fd"]);
static INET_ADDRESS: Object = object("InetSocketAddress", &[req("host", STR), req("port", STR)]);
static UNIX_ADDRESS: Object = object("UnixSocketAddress", &[req("path", STR)]);
static FD_ADDRESS: Object = object("FdSocketAddress", &[req("str", STR)]);
static SOCKET_ADDRESS: Object = Object {
    name: "SocketAddress",
    members: &[req("type", Ty::Enum(&SOCKET_ADDRESS_TYPE))],
    union: Some(Union {
        tag: "type",
        cases: Cases::List(&[
            ("inet", &INET_ADDRESS),
            ("unix", &UNIX_ADDRESS),
            ("fd", &FD_ADDRESS),
        ]),
    }),
};
static NBD_EXPORT_OPTIONS: Object = object(
    "BlockExportOptionsNbd",
    &[
        opt("name", STR),
        opt("description", STR),
        opt("bitmaps", Ty::Array(&Ty::Alternate(&BITMAP_OR_STR))),
        opt("allocation-depth", BOOL),
    ],
);
static VHOST_USER_BLK_OPTIONS: Object = object(
    "BlockExportOptionsVhostUserBlk",
    &[
        req("addr", Ty::Object(&SOCKET_ADDRESS)),
        opt("logical-block-size", INT),
        opt("num-queues", INT),
        opt("x-poll-us", INT),
    ],
);
pub(super) static EXPORT_OPTIONS: Object = Object {
    name: "BlockExportOptions",
    members: &[
        req("type", Ty::Enum(&EXPORT_TYPE)),
        req("id", STR),
        opt("fixed-iothread", BOOL),
        opt("iothread", STR),
        req("node-name", STR),
        opt("writable", BOOL),
        opt("writethrough", BOOL),
        opt("allow-inactive", BOOL),
    ],
    union: Some(Union {
        tag: "type",
        cases: Cases::List(&[
            ("nbd", &NBD_EXPORT_OPTIONS),
            ("vhost-user-blk", &VHOST_USER_BLK_OPTIONS),
        ]),
    }),
};
static EXPORT_REMOVE_MODE: Enum = enumeration("BlockExportRemoveMode", &["safe", "hard"]);
pub(super) static EXPORT_DEL_ARGS: Object = object(
    "q_obj_block-export-del-arg",
    &[req("id", STR), opt("mode", Ty::Enum(&EXPORT_REMOVE_MODE))],
);
static EXPORT_INFO: Object = object(
    "BlockExportInfo",
    &[
        req("id", STR),
        req("type", Ty::Enum(&EXPORT_TYPE)),
        req("node-name", STR),
        req("shutting-down", BOOL),
    ],
);
pub(super) const EXPORT_INFO_LIST: Ty = Ty::Array(&Ty::Object(&EXPORT_INFO));

static LEGACY_INET: Object = object(
    "InetSocketAddressWrapper",
    &[req("data", Ty::Object(&INET_ADDRESS))],
);
static LEGACY_UNIX: Object = object(
    "UnixSocketAddressWrapper",
    &[req("data", Ty::Object(&UNIX_ADDRESS))],
);
static LEGACY_FD: Object = object(
    "FdSocketAddressWrapper",
    &[req("data", Ty::Object(&FD_ADDRESS))],
);
static SOCKET_ADDRESS_LEGACY: Object = Object {
    name: "SocketAddressLegacy",
    members: &[req("type", Ty::Enum(&SOCKET_ADDRESS_TYPE))],
    union: Some(Union {
        tag: "type",
        cases: Cases::List(&[
            ("inet", &LEGACY_INET),
            ("unix", &LEGACY_UNIX),
            ("fd", &LEGACY_FD),
        ]),
    }),
};
pub(super) static NBD_SERVER_START_ARGS: Object = object(
    "q_obj_nbd-server-start-arg",
    &[
        req("addr", Ty::Object(&SOCKET_ADDRESS_LEGACY)),
        opt("tls-creds", STR),
        opt("tls-authz", STR),
        opt("max-connections", INT),
        opt("handshake-max-seconds", INT),
    ],
);
pub(super) static NBD_SERVER_ADD_ARGS: Object = object(
    "NbdServerAddOptions",
    &[
        opt("name", STR),
        opt("description", STR),
        req("device", STR),
        opt("writable", BOOL),
        opt("bitmap", STR),
    ],
);
pub(super) static NBD_SERVER_REMOVE_ARGS: Object = object(
    "q_obj_nbd-server-remove-arg",
    &[req("name", STR), opt("mode", Ty::Enum(&EXPORT_REMOVE_MODE))],
);

// Objects.

static OBJECT_TYPE: Enum = enumeration("ObjectType", &["iothread", "throttle-group"]);
/// QEMU's ThrottleLimits.
pub(super) static THROTTLE_LIMITS: Object = object(
    "ThrottleLimits",
    &[
        opt("iops-total", INT),
        opt("iops-total-max", INT),
        opt("iops-total-max-length", INT),
        opt("iops-read", INT),
        opt("iops-read-max", INT),
        opt("iops-read-max-length", INT),
        opt("iops-write", INT),
        opt("iops-write-max", INT),
        opt("iops-write-max-length", INT),
        opt("bps-total", INT),
        opt("bps-total-max", INT),
        opt("bps-total-max-length", INT),
        opt("bps-read", INT),
        opt("bps-read-max", INT),
        opt("bps-read-max-length", INT),
        opt("bps-write", INT),
        opt("bps-write-max", INT),
        opt("bps-write-max-length", INT),
        opt("iops-size", INT),
    ],
);
static THROTTLE_GROUP_PROPERTIES: Object = object(
    "ThrottleGroupProperties",
    &[opt("limits", Ty::Object(&THROTTLE_LIMITS))],
);
static IOTHREAD_PROPERTIES: Object = object(
    "IothreadProperties",
    &[
        opt("poll-max-ns", INT),
        opt("poll-grow", INT),
        opt("poll-shrink", INT),
        opt("aio-max-batch", INT),
        opt("thread-pool-min", INT),
        opt("thread-pool-max", INT),
    ],
);
pub(super) static OBJECT_OPTIONS: Object = Object {
    name: "ObjectOptions",
    members: &[req("qom-type", Ty::Enum(&OBJECT_TYPE)), req("id", STR)],
    union: Some(Union {
        tag: "qom-type",
        cases: Cases::List(&[
            ("iothread", &IOTHREAD_PROPERTIES),
            ("throttle-group", &THROTTLE_GROUP_PROPERTIES),
        ]),
    }),
};
pub(super) static OBJECT_DEL_ARGS: Object = object("q_obj_object-del-arg", &[req("id", STR)]);

// Jobs.

static JOB_TYPE: Enum = enumeration(
    "JobType",
    &["commit", "stream", "mirror", "backup", "create"],
);
static JOB_STATUS: Enum = enumeration(
    "JobStatus",
    &[
        "undefined",
        "created",
        "running",
        "paused",
        "ready",
        "standby",
        "waiting",
        "pending",
        "aborting",
        "concluded",
        "null",
    ],
);
static JOB_INFO: Object = object(
    "JobInfo",
    &[
        req("id", STR),
        req("type", Ty::Enum(&JOB_TYPE)),
        req("status", Ty::Enum(&JOB_STATUS)),
        req("current-progress", INT),
        req("total-progress", INT),
        opt("error", STR),
    ],
);
pub(super) const JOB_INFO_LIST: Ty = Ty::Array(&Ty::Object(&JOB_INFO));
static IO_STATUS: Enum = enumeration("BlockDeviceIoStatus", &["ok", "failed", "nospace"]);
static BLOCK_JOB_INFO: Object = object(
    "BlockJobInfo",
    &[
        req("type", Ty::Enum(&JOB_TYPE)),
        req("device", STR),
        req("len", INT),
        req("offset", INT),
        req("busy", BOOL),
        req("paused", BOOL),
        req("speed", INT),
        req("io-status", Ty::Enum(&IO_STATUS)),
        req("ready", BOOL),
        req("status", Ty::Enum(&JOB_STATUS)),
        req("auto-finalize", BOOL),
        req("auto-dismiss", BOOL),
        opt("error", STR),
    ],
);
pub(super) const BLOCK_JOB_INFO_LIST: Ty = Ty::Array(&Ty::Object(&BLOCK_JOB_INFO));
/// job-* (and block-job-finalize, block-job-dismiss): the job's id.
pub(super) static JOB_ID_ARGS: Object = object("q_obj_job-pause-arg", &[req("id", STR)]);
/// block-job-*: the job's id as `device`.
pub(super) static BLOCK_JOB_ARGS: Object =
    object("q_obj_block-job-pause-arg", &[req("device", STR)]);
pub(super) static BLOCK_JOB_CANCEL_ARGS: Object = object(
    "q_obj_block-job-cancel-arg",
    &[req("device", STR), opt("force", BOOL)],
);
pub(super) static BLOCK_JOB_SET_SPEED_ARGS: Object = object(
    "q_obj_block-job-set-speed-arg",
    &[req("device", STR), req("speed", INT)],
);
static SYNC_MODE: Enum = enumeration(
    "MirrorSyncMode",
    &["top", "full", "none", "incremental", "bitmap"],
);
static BITMAP_SYNC_MODE: Enum = enumeration("BitmapSyncMode", &["on-success", "never", "always"]);
static ON_ERROR: Enum = enumeration(
    "BlockdevOnError",
    &["report", "ignore", "enospc", "stop", "auto"],
);
/// Accepted and ignored: blkgraph's copies size themselves.
static BACKUP_PERF: Object = object(
    "BackupPerf",
    &[
        opt("use-copy-range", BOOL),
        opt("max-workers", INT),
        opt("max-chunk", INT),
        opt("min-cluster-size", INT),
    ],
);
pub(super) static BLOCKDEV_BACKUP_ARGS: Object = object(
    "BlockdevBackup",
    &[
        opt("job-id", STR),
        req("device", STR),
        req("sync", Ty::Enum(&SYNC_MODE)),
        opt("speed", INT),
        opt("bitmap", STR),
        opt("bitmap-mode", Ty::Enum(&BITMAP_SYNC_MODE)),
        opt("compress", BOOL),
        opt("on-source-error", Ty::Enum(&ON_ERROR)),
        opt("on-target-error", Ty::Enum(&ON_ERROR)),
        opt("auto-finalize", BOOL),
        opt("auto-dismiss", BOOL),
        opt("filter-node-name", STR),
        opt("discard-source", BOOL),
        opt("x-perf", Ty::Object(&BACKUP_PERF)),
        req("target", STR),
    ],
);
static COPY_MODE: Enum = enumeration("MirrorCopyMode", &["background", "write-blocking"]);
/// QEMU's blockdev-mirror arguments, without `replaces` (refused whatever
/// its value).
pub(super) static BLOCKDEV_MIRROR_ARGS: Object = object(
    "q_obj_blockdev-mirror-arg",
    &[
        opt("job-id", STR),
        req("device", STR),
        req("target", STR),
        req("sync", Ty::Enum(&SYNC_MODE)),
        opt("speed", INT),
        opt("granularity", INT),
        opt("buf-size", INT),
        opt("on-source-error", Ty::Enum(&ON_ERROR)),
        opt("on-target-error", Ty::Enum(&ON_ERROR)),
        opt("filter-node-name", STR),
        opt("copy-mode", Ty::Enum(&COPY_MODE)),
        opt("auto-finalize", BOOL),
        opt("auto-dismiss", BOOL),
    ],
);
/// QEMU's block-stream arguments, without `filter-node-name` (refused
/// whatever its value).
pub(super) static BLOCK_STREAM_ARGS: Object = object(
    "q_obj_block-stream-arg",
    &[
        opt("job-id", STR),
        req("device", STR),
        opt("base", STR),
        opt("base-node", STR),
        opt("backing-file", STR),
        opt("backing-mask-protocol", BOOL),
        opt("bottom", STR),
        opt("speed", INT),
        opt("on-error", Ty::Enum(&ON_ERROR)),
        opt("auto-finalize", BOOL),
        opt("auto-dismiss", BOOL),
    ],
);
/// QEMU's block-commit arguments.
pub(super) static BLOCK_COMMIT_ARGS: Object = object(
    "q_obj_block-commit-arg",
    &[
        opt("job-id", STR),
        req("device", STR),
        opt("base-node", STR),
        opt("base", STR),
        opt("top-node", STR),
        opt("top", STR),
        opt("backing-file", STR),
        opt("backing-mask-protocol", BOOL),
        opt("speed", INT),
        opt("on-error", Ty::Enum(&ON_ERROR)),
        opt("filter-node-name", STR),
        opt("auto-finalize", BOOL),
        opt("auto-dismiss", BOOL),
    ],
);
/// The preallocation modes blockdev-create takes: none.
static PREALLOC_MODE: Enum = enumeration("PreallocMode", &["off"]);
static CREATE_FILE: Object = object(
    "BlockdevCreateOptionsFile",
    &[
        req("filename", STR),
        req("size", INT),
        opt("preallocation", Ty::Enum(&PREALLOC_MODE)),
        opt("nocow", BOOL),
        opt("extent-size-hint", INT),
    ],
);
/// A blkgraph extension: QEMU's raw variant has no members.
static CREATE_RAW: Object = object(
    "BlockdevCreateOptionsRaw",
    &[req("file", STR), req("size", INT)],
);
static QCOW2_VERSION: Enum = enumeration("BlockdevQcow2Version", &["v2", "v3"]);
static QCOW2_COMPRESSION: Enum = enumeration("Qcow2CompressionType", &["zlib", "zstd"]);
/// QEMU's qcow2 options, without encryption and external data files
/// (refused whatever their value); `file` is the node-name of an open
/// file node.
static CREATE_QCOW2: Object = object(
    "BlockdevCreateOptionsQcow2",
    &[
        req("file", STR),
        opt("extended-l2", BOOL),
        req("size", INT),
        opt("version", Ty::Enum(&QCOW2_VERSION)),
        opt("backing-file", STR),
        opt("backing-fmt", STR),
        opt("cluster-size", INT),
        opt("preallocation", Ty::Enum(&PREALLOC_MODE)),
        opt("lazy-refcounts", BOOL),
        opt("refcount-bits", INT),
        opt("compression-type", Ty::Enum(&QCOW2_COMPRESSION)),
    ],
);
static CREATE_DRIVER: Enum = enumeration("BlockdevCreateDriver", &["file", "raw", "qcow2"]);
static CREATE_OPTIONS: Object = Object {
    name: "BlockdevCreateOptions",
    members: &[req("driver", Ty::Enum(&CREATE_DRIVER))],
    union: Some(Union {
        tag: "driver",
        cases: Cases::List(&[
            ("file", &CREATE_FILE),
            ("raw", &CREATE_RAW),
            ("qcow2", &CREATE_QCOW2),
        ]),
    }),
};
pub(super) static BLOCKDEV_CREATE_ARGS: Object = object(
    "q_obj_blockdev-create-arg",
    &[
        req("job-id", STR),
        req("options", Ty::Object(&CREATE_OPTIONS)),
    ],
);

// Events.

static EXPORT_DELETED: Object = object("q_obj_BLOCK_EXPORT_DELETED-arg", &[req("id", STR)]);
static WRITE_THRESHOLD: Object = object(
    "q_obj_BLOCK_WRITE_THRESHOLD-arg",
    &[
        req("node-name", STR),
        req("amount-exceeded", INT),
        req("write-threshold", INT),
    ],
);
static JOB_STATUS_CHANGE: Object = object(
    "q_obj_JOB_STATUS_CHANGE-arg",
    &[req("id", STR), req("status", Ty::Enum(&JOB_STATUS))],
);
/// BLOCK_JOB_CANCELLED's and BLOCK_JOB_READY's data.
static BLOCK_JOB_EVENT: Object = object(
    "q_obj_BLOCK_JOB_CANCELLED-arg",
    &[
        req("type", Ty::Enum(&JOB_TYPE)),
        req("device", STR),
        req("len", INT),
        req("offset", INT),
        req("speed", INT),
    ],
);
static BLOCK_JOB_COMPLETED: Object = object(
    "q_obj_BLOCK_JOB_COMPLETED-arg",
    &[
        req("type", Ty::Enum(&JOB_TYPE)),
        req("device", STR),
        req("len", INT),
        req("offset", INT),
        req("speed", INT),
        opt("error", STR),
    ],
);
static IO_OPERATION: Enum = enumeration("IoOperationType", &["read", "write"]);
static ERROR_ACTION: Enum = enumeration("BlockErrorAction", &["ignore", "report", "stop"]);
static BLOCK_JOB_ERROR: Object = object(
    "q_obj_BLOCK_JOB_ERROR-arg",
    &[
        req("device", STR),
        req("operation", Ty::Enum(&IO_OPERATION)),
        req("action", Ty::Enum(&ERROR_ACTION)),
    ],
);
static BLOCK_JOB_PENDING: Object = object(
    "q_obj_BLOCK_JOB_PENDING-arg",
    &[req("type", Ty::Enum(&JOB_TYPE)), req("id", STR)],
);
static SNAPSHOT_BROKEN: Object = object(
    "q_obj___org.blkgraph_SNAPSHOT_BROKEN-arg",
    &[req("node-name", STR), req("error", STR)],
);
static BITMAP_LOST: Object = object(
    "q_obj___org.blkgraph_BLOCK_DIRTY_BITMAP_LOST-arg",
    &[req("node", STR), req("name", STR)],
);

/// Every event blkgraph sends.
pub(super) static EVENTS: &[EventDef] = &[
    EventDef {
        name: "BLOCK_EXPORT_DELETED",
        data: &EXPORT_DELETED,
    },
    EventDef {
        name: "BLOCK_WRITE_THRESHOLD",
        data: &WRITE_THRESHOLD,
    },
    EventDef {
        name: blkgraph_graph::SNAPSHOT_BROKEN_EVENT,
        data: &SNAPSHOT_BROKEN,
    },
    EventDef {
        name: crate::state_file::BITMAP_LOST_EVENT,
        data: &BITMAP_LOST,
    },
    EventDef {
        name: "JOB_STATUS_CHANGE",
        data: &JOB_STATUS_CHANGE,
    },
    EventDef {
        name: "BLOCK_JOB_COMPLETED",
        data: &BLOCK_JOB_COMPLETED,
    },
    EventDef {
        name: "BLOCK_JOB_CANCELLED",
        data: &BLOCK_JOB_EVENT,
    },
    EventDef {
        name: "BLOCK_JOB_READY",
        data: &BLOCK_JOB_EVENT,
    },
    EventDef {
        name: "BLOCK_JOB_ERROR",
        data: &BLOCK_JOB_ERROR,
    },
    EventDef {
        name: "BLOCK_JOB_PENDING",
        data: &BLOCK_JOB_PENDING,
    },
];
