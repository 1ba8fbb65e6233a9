//! The parts of librados and librbd (Ceph 16.2, librbd 1.16) that the rbd
//! driver uses, declared by hand from `rados/librados.h` and
//! `rbd/librbd.h`.
//!
//! The libraries are loaded on first use with `dlopen`, as QEMU loads its
//! rbd module: blkgraph builds and runs without Ceph installed, and only an
//! rbd node fails to open, with an error that says which library is
//! missing.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

/// `rados_t`.
pub type Rados = *mut c_void;
/// `rados_ioctx_t`.
pub type IoCtx = *mut c_void;
/// `rbd_image_t`.
pub type Image = *mut c_void;
/// `rbd_completion_t`.
pub type Completion = *mut c_void;
/// `rbd_callback_t`.
pub type Callback = unsafe extern "C" fn(c: Completion, arg: *mut c_void);
/// The callback of `rbd_diff_iterate2`: offset, length, exists, argument;
/// a negative return stops the iteration with that value.
pub type DiffCallback = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// `RBD_FEATURE_FAST_DIFF` from `rbd/features.h`.
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_FLAG_FAST_DIFF_INVALID` from `rbd/librbd.h`.
pub const FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

/// The functions, resolved once.
pub struct Lib {
    pub rados_create2: unsafe extern "C" fn(*mut Rados, *const c_char, *const c_char, u64) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(Rados, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(Rados, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(Rados) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(Rados),
    pub rados_ioctx_create: unsafe extern "C" fn(Rados, *const c_char, *mut IoCtx) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(IoCtx),
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(IoCtx, *const c_char),
    pub rbd_open: unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(IoCtx, *const c_char, *mut Image, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(Image) -> c_int,
    pub rbd_stat: unsafe extern "C" fn(Image, *mut ImageInfo, usize) -> c_int,
    pub rbd_get_features: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_get_flags: unsafe extern "C" fn(Image, *mut u64) -> c_int,
    pub rbd_resize: unsafe extern "C" fn(Image, u64) -> c_int,
    pub rbd_diff_iterate2: unsafe extern "C" fn(
        Image,
        *const c_char,
        u64,
        u64,
        u8,
        u8,
        DiffCallback,
        *mut c_void,
    ) -> c_int,
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, Callback, *mut Completion) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(Completion) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(Completion),
    pub rbd_aio_readv:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int,
    pub rbd_aio_writev:
        unsafe extern "C" fn(Image, *const libc::iovec, c_int, u64, Completion) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(Image, Completion) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(Image, u64, u64, Completion) -> c_int,
    pub rbd_aio_write_zeroes:
        unsafe extern "C" fn(Image, u64, usize, Completion, c_int, c_int) -> c_int,
    /// Keeps the code the pointers point into loaded.
    _libs: (Library, Library),
}

/// Resolves `name` in `lib` as a function pointer of type `T`.
///
/// # Safety
/// `T` must be the function's true signature.
unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
    let mut cname = name.as_bytes().to_vec();
    cname.push(0);
    // SAFETY: the caller promises `T` is the symbol's type.
    unsafe { lib.get::<T>(&cname) }
        .map(|s| *s)
        .map_err(|e| format!("librbd has no {name}: {e}"))
}

fn load() -> Result<Lib, String> {
    // SAFETY: librados and librbd run no unsound code when loaded (their
    // initialisers set up static state only).
    let rados = unsafe { Library::new("librados.so.2") }
        .map_err(|e| format!("cannot load librados.so.2 (is librados2 installed?): {e}"))?;
    // SAFETY: as above.
    let rbd = unsafe { Library::new("librbd.so.1") }
        .map_err(|e| format!("cannot load librbd.so.1 (is librbd1 installed?): {e}"))?;
    // SAFETY: for every `sym` call below, the types are those of the
    // declarations in Ceph 16.2's librados.h and librbd.h.
    unsafe {
        Ok(Lib {
            rados_create2: sym(&rados, "rados_create2")?,
            rados_conf_read_file: sym(&rados, "rados_conf_read_file")?,
            rados_conf_set: sym(&rados, "rados_conf_set")?,
            rados_connect: sym(&rados, "rados_connect")?,
            rados_shutdown: sym(&rados, "rados_shutdown")?,
            rados_ioctx_create: sym(&rados, "rados_ioctx_create")?,
            rados_ioctx_destroy: sym(&rados, "rados_ioctx_destroy")?,
            rados_ioctx_set_namespace: sym(&rados, "rados_ioctx_set_namespace")?,
            rbd_open: sym(&rbd, "rbd_open")?,
            rbd_open_read_only: sym(&rbd, "rbd_open_read_only")?,
            rbd_close: sym(&rbd, "rbd_close")?,
            rbd_stat: sym(&rbd, "rbd_stat")?,
            rbd_get_features: sym(&rbd, "rbd_get_features")?,
            rbd_get_flags: sym(&rbd, "rbd_get_flags")?,
            rbd_resize: sym(&rbd, "rbd_resize")?,
            rbd_diff_iterate2: sym(&rbd, "rbd_diff_iterate2")?,
            rbd_aio_create_completion: sym(&rbd, "rbd_aio_create_completion")?,
            rbd_aio_get_return_value: sym(&rbd, "rbd_aio_get_return_value")?,
            rbd_aio_release: sym(&rbd, "rbd_aio_release")?,
            rbd_aio_readv: sym(&rbd, "rbd_aio_readv")?,
            rbd_aio_writev: sym(&rbd, "rbd_aio_writev")?,
            rbd_aio_flush: sym(&rbd, "rbd_aio_flush")?,
            rbd_aio_discard: sym(&rbd, "rbd_aio_discard")?,
            rbd_aio_write_zeroes: sym(&rbd, "rbd_aio_write_zeroes")?,
            _libs: (rados, rbd),
        })
    }
}

/// The loaded libraries, or why they could not be loaded.
pub fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// `rbd_image_info_t`, filled by `rbd_stat`.
#[repr(C)]
pub struct ImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}
