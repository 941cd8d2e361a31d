//! The one place where core errors become Python exceptions.

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::Error;

fn ferrolm_exception(py: Python<'_>, name: &str, msg: String) -> PyErr {
    match py.import("ferrolm.errors").and_then(|m| m.getattr(name)) {
        Ok(ty) => {
            PyErr::from_type(ty.cast_into().expect("ferrolm.errors holds exception types"), msg)
        }
        Err(e) => e,
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::Value(_) | Error::DisallowedSpecial(_) => PyValueError::new_err(msg),
            Error::UnknownId { .. } | Error::UnknownToken(_) => {
                Python::attach(|py| ferrolm_exception(py, "UnknownTokenError", msg))
            }
            Error::Format(_) => Python::attach(|py| ferrolm_exception(py, "FormatError", msg)),
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(msg)
            }
            Error::Io { .. } => PyOSError::new_err(msg),
        }
    }
}
