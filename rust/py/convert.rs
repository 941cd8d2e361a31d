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
    fn PyUnicode_AsUTF8AndSize(
        unicode: *mut ffi::PyObject,
        size: *mut ffi::Py_ssize_t,
    ) -> *const c_char;
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
        return Err(PyTypeError::new_err(
            "texts must be a list of str, not a single str; use encode() for one text",
        ));
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

use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};

use crate::data::Row;

/// Sequences of ids extracted from Python: the objects (kept alive) and, for lists, their
/// converted ids. [`Sequences::rows`] views them without copying arrays.
pub struct Sequences<'py> {
    items: Vec<Bound<'py, PyAny>>,
    /// `Some` for items that were lists/tuples (converted), `None` for arrays (viewed).
    owned: Vec<Option<Vec<i64>>>,
    kinds: Vec<Kind>,
}

#[derive(Clone, Copy)]
enum Kind {
    I64,
    I32,
    U32,
    U16,
    U8,
    List,
}

fn array_kind(a: &Bound<'_, PyUntypedArray>, index: usize) -> PyResult<Kind> {
    let what = format_args!("sequence {index}");
    let d = a.dtype();
    let kind = match (d.kind(), d.itemsize()) {
        (b'i', 8) => Kind::I64,
        (b'i', 4) => Kind::I32,
        (b'u', 4) => Kind::U32,
        (b'u', 2) => Kind::U16,
        (b'u', 1) => Kind::U8,
        _ => {
            return Err(PyTypeError::new_err(format!(
                "{what} has dtype {d}; expected an integer array \
                 (int64, int32, uint32, uint16 or uint8)"
            )))
        }
    };
    if a.ndim() != 1 {
        return Err(PyTypeError::new_err(format!(
            "{what} is a {}-D array; expected 1-D",
            a.ndim()
        )));
    }
    if !a.is_contiguous() || d.is_native_byteorder() == Some(false) {
        return Err(PyTypeError::new_err(format!(
            "{what} is a non-contiguous or byte-swapped array; pass numpy.ascontiguousarray(x)"
        )));
    }
    Ok(kind)
}

impl<'py> Sequences<'py> {
    /// Extracts one sequence (a 1-D integer array, read in place, or a list/tuple of ints).
    pub fn one(item: Bound<'py, PyAny>, what: &str) -> PyResult<Self> {
        let mut s = Sequences {
            items: Vec::with_capacity(1),
            owned: Vec::with_capacity(1),
            kinds: Vec::with_capacity(1),
        };
        s.push(item, 0).map_err(|e| {
            // Re-word the message for a single sequence.
            Python::attach(|py| {
                PyTypeError::new_err(e.value(py).to_string().replacen("sequence 0", what, 1))
            })
        })?;
        Ok(s)
    }

    /// Extracts a batch: a list/tuple/iterable of sequences, or a 2-D integer array.
    pub fn many(seq: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(a) = seq.cast::<PyUntypedArray>() {
            if a.ndim() == 2 {
                let rows: Vec<Bound<'py, PyAny>> = seq.try_iter()?.collect::<PyResult<_>>()?;
                return Self::from_items(rows);
            }
        }
        if seq.is_instance_of::<pyo3::types::PyString>() {
            return Err(PyTypeError::new_err("expected a list of sequences of ids, got a str"));
        }
        let items: Vec<Bound<'py, PyAny>> = match seq.cast::<PyList>() {
            Ok(list) => list.iter().collect(),
            Err(_) => seq
                .try_iter()
                .map_err(|_| {
                    PyTypeError::new_err(
                        "expected a list of sequences of ids (lists of ints or 1-D integer arrays)",
                    )
                })?
                .collect::<PyResult<_>>()?,
        };
        Self::from_items(items)
    }

    fn from_items(items: Vec<Bound<'py, PyAny>>) -> PyResult<Self> {
        let n = items.len();
        let mut s = Sequences {
            items: Vec::with_capacity(n),
            owned: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
        };
        for (i, it) in items.into_iter().enumerate() {
            s.push(it, i)?;
        }
        Ok(s)
    }

    fn push(&mut self, item: Bound<'py, PyAny>, index: usize) -> PyResult<()> {
        let what = || format!("sequence {index}");
        if let Ok(a) = item.cast::<PyUntypedArray>() {
            let k = array_kind(a, index)?;
            self.kinds.push(k);
            self.owned.push(None);
        } else if item.is_instance_of::<PyList>() || item.is_instance_of::<pyo3::types::PyTuple>() {
            let v: Vec<i64> = item.extract().map_err(|_| {
                PyTypeError::new_err(format!("{} must hold only ints (within int64)", what()))
            })?;
            self.kinds.push(Kind::List);
            self.owned.push(Some(v));
        } else {
            return Err(PyTypeError::new_err(format!(
                "{} must be a list of ints or a 1-D integer numpy array, got {}",
                what(),
                item.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
            )));
        }
        self.items.push(item);
        Ok(())
    }

    /// Views of the sequences.
    ///
    /// Arrays are read in place without rust-numpy's borrow tracking (measured ~0.2 µs per
    /// array, most of a 64-row collate). SAFETY of that: the arrays were checked to be 1-D,
    /// contiguous, native-order integer arrays of the matching width, and `self` holds a
    /// reference to each, so the buffers stay allocated while the views live. As with any
    /// reader of a numpy buffer, a concurrent writer to the same array (another thread) would
    /// race; the values read would be torn, never out of bounds.
    pub fn rows(&self) -> Vec<Row<'_>> {
        self.items
            .iter()
            .zip(&self.owned)
            .zip(&self.kinds)
            .map(|((item, owned), kind)| {
                if let Some(v) = owned {
                    return Row::I64(v);
                }
                // SAFETY: see above; `item` is an array (checked in `push`).
                unsafe {
                    let a = item.cast_unchecked::<PyUntypedArray>();
                    let n = a.len();
                    let ptr = (*a.as_array_ptr()).data as *const u8;
                    if n == 0 || ptr.is_null() {
                        return Row::I64(&[]);
                    }
                    match kind {
                        Kind::I64 => Row::I64(std::slice::from_raw_parts(ptr as *const i64, n)),
                        Kind::I32 => Row::I32(std::slice::from_raw_parts(ptr as *const i32, n)),
                        Kind::U32 => Row::U32(std::slice::from_raw_parts(ptr as *const u32, n)),
                        Kind::U16 => Row::U16(std::slice::from_raw_parts(ptr as *const u16, n)),
                        Kind::U8 => Row::U8(std::slice::from_raw_parts(ptr, n)),
                        Kind::List => unreachable!("lists are owned"),
                    }
                }
            })
            .collect()
    }
}
