//! Row-major matrices of token embeddings: the borrowed view [`EmbRef`] and the owned [`Matrix`].

use crate::{Error, Result};

/// A borrowed row-major `rows × dim` matrix of token embeddings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmbRef<'a> {
    data: &'a [f32],
    rows: usize,
    dim: usize,
}

impl<'a> EmbRef<'a> {
    /// Wraps `data` (`rows × dim`, row-major). Fails if `dim` is 0 or `data.len()` is not a multiple of `dim`.
    pub fn new(data: &'a [f32], dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(Error::Shape("embedding dimension is 0".into()));
        }
        if !data.len().is_multiple_of(dim) {
            return Err(Error::Shape(format!(
                "{} values are not a whole number of rows of dimension {dim}",
                data.len()
            )));
        }
        Ok(Self {
            data,
            rows: data.len() / dim,
            dim,
        })
    }
    /// The values, row-major.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }
    /// Number of rows (tokens).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Embedding dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }
}

/// A dense row-major 2-D float32 matrix that owns its values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Matrix {
    /// Number of rows (tokens).
    pub rows: usize,
    /// Number of columns (embedding dimension).
    pub cols: usize,
    /// `rows * cols` values, row-major.
    pub data: Vec<f32>,
}

impl Matrix {
    /// A matrix from its parts; fails unless `data.len() == rows * cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(Error::Shape(format!(
                "expected {rows} × {cols} = {} values, got {}",
                rows.saturating_mul(cols),
                data.len()
            )));
        }
        Ok(Self { rows, cols, data })
    }

    /// The borrowed view of this matrix (fails when `cols` is 0).
    pub fn view(&self) -> Result<EmbRef<'_>> {
        EmbRef::new(&self.data, self.cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_check_their_shape() {
        let v = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let e = EmbRef::new(&v, 3).unwrap();
        assert_eq!((e.rows(), e.dim()), (2, 3));
        assert!(EmbRef::new(&v, 4)
            .unwrap_err()
            .to_string()
            .contains("dimension 4"));
        assert!(EmbRef::new(&v, 0).is_err());
        let m = Matrix::new(2, 3, v.to_vec()).unwrap();
        assert_eq!(m.view().unwrap(), e);
        let err = Matrix::new(2, 2, v.to_vec()).unwrap_err().to_string();
        assert!(err.contains("expected 2 × 2 = 4 values, got 6"), "{err}");
    }
}
