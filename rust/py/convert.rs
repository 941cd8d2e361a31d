//! Argument conversion shared by the bindings.

use std::borrow::Cow;
use std::os::raw::c_char;

use pyo3::exceptions::{PyTypeError, PyUnicodeEncodeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyList;

extern "C" {
    // In every CPython 3.x (the stable ABI gained it in 3.10 with this same signature). pyo3
    // hides it under abi3-py39; it is declared here to read a str's UTF-8 without a copy (for
    // ASCII strings CPython returns its own buffer): the copy through PyUnicode_AsUTF8String
    // cost ~15% of encode time on one-line documents.
    fn PyUnicode_AsUTF8AndSize(unicode: *mut ffi::PyObject, size: *mut ffi::Py_ssize_t) -> *const c_char;
}

/// Below this many bytes, a call runs without releasing the GIL: releasing and re-taking it
/// costs more than the work (measured ~0.2 µs against ~1 µs for a one-line document).
pub const DETACH_MIN_BYTES: usize = 2048;

/// Runs `f` with the GIL released when `work_bytes` is large enough to be worth it.
pub fn run<T: Send>(py: Python<'_>, work_bytes: usize, f: impl FnOnce() -> T + Send) -> T {
    if work_bytes >= DETACH_MIN_BYTES {
        py.detach(f)
    } else {
        f()
    }
}

/// The text of a Python `str` as UTF-8: borrowed from the object when possible; lone
/// surrogates (which UTF-8 cannot hold) are replaced by U+FFFD, as tiktoken does.
pub fn text<'a>(obj: &'a Bound<'_, PyAny>, what: &str) -> PyResult<Cow<'a, str>> {
    // SAFETY: PyUnicode_Check only reads the type of a live object.
    if unsafe { ffi::PyUnicode_Check(obj.as_ptr()) } == 0 {
        return Err(PyTypeError::new_err(format!(
            "{what} must be a str, got {}; decode bytes first (bytes.decode('utf-8'))",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
        )));
    }
    let mut size: ffi::Py_ssize_t = 0;
    // SAFETY: obj is a str (checked above). The returned buffer is owned by the str object,
    // which stays alive (and immutable) for 'a because we borrow it for 'a.
    let ptr = unsafe { PyUnicode_AsUTF8AndSize(obj.as_ptr(), &mut size) };
    if !ptr.is_null() {
        // SAFETY: CPython guarantees `size` bytes of valid UTF-8 at `ptr`.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, size as usize) };
        return Ok(Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(bytes) }));
    }
    let err = PyErr::fetch(obj.py());
    if !err.is_instance_of::<PyUnicodeEncodeError>(obj.py()) {
        return Err(err);
    }
    let fixed = obj
        .call_method1("encode", ("utf-16", "surrogatepass"))?
        .call_method1("decode", ("utf-16", "replace"))?;
    Ok(Cow::Owned(fixed.extract::<String>()?))
}

/// The items of a list of `str` (kept alive by the returned owners).
pub fn str_items<'py>(texts: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if texts.is_instance_of::<pyo3::types::PyString>() {
        return Err(PyTypeError::new_err("texts must be a list of str, not a single str; use encode() for one text"));
    }
    let items: Vec<Bound<'py, PyAny>> = match texts.cast::<PyList>() {
        Ok(list) => list.iter().collect(),
        Err(_) => texts
            .try_iter()
            .map_err(|_| PyTypeError::new_err("texts must be a list (or iterable) of str"))?
            .collect::<PyResult<_>>()?,
    };
    Ok(items)
}

/// Borrowed UTF-8 views of `items` (see [`text`]); the error names the bad index.
pub fn texts<'a>(items: &'a [Bound<'_, PyAny>]) -> PyResult<Vec<Cow<'a, str>>> {
    items.iter().enumerate().map(|(i, t)| text(t, &format!("texts[{i}]"))).collect()
}
