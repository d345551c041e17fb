//! The same ColBERT model over trainable variables: every weight becomes a candle [`Var`] registered in
//! a [`VarMap`], and the unchanged forward code (in [`Mode::Train`](crate::Mode)) computes gradients.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::backbone::var_builder;
use crate::{ColBERT, Dense, Result};

impl ColBERT {
    /// A copy of this model whose weights are trainable variables registered in `varmap`, named as
    /// PyTorch names the parameters of a sentence-transformers model: `0.<backbone weight>` for the
    /// transformer, `<i>.<name>` for the i-th module after it (`1.linear.weight`, ...).
    ///
    /// The variables share storage with the returned model: an optimiser that updates them updates the
    /// model, and [`ColBERT::save`] writes the current values. Run it in [`Mode::Train`](crate::Mode);
    /// it also encodes (the inference kernels re-pack variables on every call rather than caching them),
    /// but [`ColBERT::snapshot`] is faster for repeated inference.
    pub fn to_trainable(&self, varmap: &VarMap) -> Result<ColBERT> {
        let mut out = self.clone();
        out.transformer = self.transformer.to_trainable(varmap, "0.")?;
        let device = self.transformer.device().clone();
        let mut denses = Vec::with_capacity(self.denses.len());
        for (i, d) in self.denses.iter().enumerate() {
            let prefix = format!("{}", i + 1);
            {
                let mut data = varmap.data().lock().unwrap();
                for (name, t) in d.tensors() {
                    data.insert(format!("{prefix}.{name}"), Var::from_tensor(&t)?);
                }
            }
            let vb = VarBuilder::from_varmap(varmap, candle_core::DType::F32, &device);
            denses.push(Dense::load(vb.pp(prefix), &d.config())?);
        }
        out.denses = denses;
        Ok(out)
    }

    /// A frozen deep copy: fresh tensors holding the current values (so later updates of trainable
    /// variables do not reach it) and fresh kernel caches. This is what evaluators and checkpoints use.
    pub fn snapshot(&self) -> Result<ColBERT> {
        let mut out = self.clone();
        let weights: HashMap<String, Tensor> = self
            .transformer
            .weights
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.copy()?)))
            .collect::<Result<_>>()?;
        out.transformer.weights = weights;
        out.transformer.rebuild()?;
        let device = self.transformer.device().clone();
        out.denses = self
            .denses
            .iter()
            .map(|d| {
                let map: HashMap<String, Tensor> = d
                    .tensors()
                    .into_iter()
                    .map(|(k, v)| Ok((k, v.copy()?)))
                    .collect::<Result<_>>()?;
                Dense::load(var_builder(map, &device), &d.config())
            })
            .collect::<Result<_>>()?;
        Ok(out)
    }

    /// Every weight by its parameter name (`0.<backbone weight>`, `<i>.<name>`), in a stable order.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .transformer
            .weights
            .iter()
            .map(|(k, v)| (format!("0.{k}"), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        for (i, d) in self.denses.iter().enumerate() {
            for (k, v) in d.tensors() {
                out.push((format!("{}.{k}", i + 1), v));
            }
        }
        out
    }
}
