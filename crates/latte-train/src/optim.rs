//! AdamW as `torch.optim.AdamW` computes it, the Hugging Face Trainer's weight-decay groups, learning-rate
//! schedules and gradient clipping by global norm.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::loss::Param;
use crate::{Error, Result};

/// Whether the Hugging Face Trainer applies weight decay to a parameter: not to biases nor to any
/// normalisation weight (names containing `bias`, `layernorm`, `rmsnorm`, a `norm` or `*_norm` component).
pub fn decays(name: &str) -> bool {
    let n = name.to_lowercase();
    if n.contains("bias") || n.contains("layernorm") || n.contains("rmsnorm") {
        return false;
    }
    !n.split('.')
        .any(|part| part == "norm" || part.ends_with("_norm"))
}

/// AdamW hyper-parameters (PyTorch / Trainer defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (applied only where [`decays`] says so).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW with per-parameter first and second moments.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Optimisation steps taken (the bias-correction step count of parameters that got gradients).
    steps: HashMap<String, u64>,
    /// First and second moments of every parameter that got a gradient.
    moments: HashMap<String, Moments>,
}

/// The moments of one parameter: plain vectors for float32 parameters on the CPU (updated in place by the
/// fused kernel, [`latte_kernels::adamw`]), tensors on other devices and dtypes (updated by tensor ops).
#[derive(Debug)]
enum Moments {
    Host {
        m: Vec<f32>,
        v: Vec<f32>,
        shape: candle_core::Shape,
    },
    Tensors {
        m: Tensor,
        v: Tensor,
    },
}

impl Moments {
    fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Host { m, v, shape } => (
                Tensor::from_slice(m, shape, device)?,
                Tensor::from_slice(v, shape, device)?,
            ),
            Moments::Tensors { m, v } => (m.clone(), v.clone()),
        })
    }
}

impl AdamW {
    /// A fresh optimiser.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            steps: HashMap::new(),
            moments: HashMap::new(),
        }
    }

    /// One step at learning rate `lr`: for every parameter with a gradient,
    /// `p ← p·(1 − lr·wd)`, then the bias-corrected Adam update. Parameters without a gradient are left
    /// alone (as PyTorch skips parameters whose `.grad` is None).
    pub fn step(&mut self, params: &[Param], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let c = self.config;
        for ((name, var), g) in params.iter().zip(grads) {
            let Some(g) = g else { continue };
            let t = {
                let s = self.steps.entry(name.clone()).or_insert(0);
                *s += 1;
                *s
            };
            let decay = if decays(name) { c.weight_decay } else { 0.0 };
            let p = var.as_tensor();
            if p.device().is_cpu() && p.dtype() == DType::F32 {
                self.step_host(name, var, g, t, lr, decay)?;
                continue;
            }
            let g = g.to_dtype(DType::F32)?;
            let prev = match self.moments.get(name) {
                Some(mo) => Some(mo.tensors(p.device())?),
                None => None,
            };
            let m = match &prev {
                Some((m, _)) => ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?,
                None => (&g * (1.0 - c.beta1))?,
            };
            let v = match &prev {
                Some((_, v)) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                None => (g.sqr()? * (1.0 - c.beta2))?,
            };
            let bc1 = 1.0 - c.beta1.powi(t as i32);
            let bc2 = 1.0 - c.beta2.powi(t as i32);
            let p_dec = if decay != 0.0 {
                (p * (1.0 - lr * decay))?
            } else {
                p.clone()
            };
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let update = ((&m / &denom)? * (lr / bc1))?;
            let new = (p_dec - update)?;
            var.set(&new)?;
            self.moments.insert(name.clone(), Moments::Tensors { m, v });
        }
        Ok(())
    }

    /// One step of a float32 parameter on the CPU: the fused in-place update (the same numbers as the
    /// tensor ops of [`AdamW::step`], one pass instead of some fifteen).
    fn step_host(
        &mut self,
        name: &str,
        var: &candle_core::Var,
        g: &Tensor,
        t: u64,
        lr: f64,
        decay: f64,
    ) -> Result<()> {
        let c = self.config;
        let p = var.as_tensor();
        let shape = p.shape().clone();
        let mut pv: Vec<f32> = p.flatten_all()?.to_vec1()?;
        let gv: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if gv.len() != pv.len() {
            return Err(Error::Invalid(format!(
                "AdamW: the gradient of {name} has {} values for a parameter of shape {shape:?}",
                gv.len()
            )));
        }
        let (mut m, mut v) = match self.moments.remove(name) {
            Some(Moments::Host { m, v, .. }) => (m, v),
            Some(Moments::Tensors { m, v }) => (
                m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                v.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            ),
            None => (vec![0f32; pv.len()], vec![0f32; pv.len()]),
        };
        if m.len() != pv.len() || v.len() != pv.len() {
            return Err(Error::Invalid(format!(
                "AdamW: the saved moments of {name} have {} and {} values for a parameter of shape {shape:?}",
                m.len(),
                v.len()
            )));
        }
        latte_kernels::adamw::adamw_step(
            &mut pv,
            &gv,
            &mut m,
            &mut v,
            latte_kernels::adamw::AdamWStep {
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                lr,
                weight_decay: decay,
                step: t,
            },
        );
        var.set(&Tensor::from_vec(pv, &shape, p.device())?)?;
        self.moments
            .insert(name.to_string(), Moments::Host { m, v, shape });
        Ok(())
    }

    /// Writes the moments and step counts (`optimizer.safetensors`) to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (k, mo) in &self.moments {
            let (m, v) = mo.tensors(&Device::Cpu)?;
            tensors.push((format!("exp_avg.{k}"), m));
            tensors.push((format!("exp_avg_sq.{k}"), v));
            tensors.push((
                format!("step.{k}"),
                Tensor::new(&[self.steps[k] as f64], &Device::Cpu)?,
            ));
        }
        let data: Vec<(String, Tensor)> = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&data.into_iter().collect::<HashMap<_, _>>(), path)?;
        Ok(())
    }

    /// Restores the state written by [`AdamW::save`].
    pub fn load(config: AdamWConfig, path: &Path, device: &Device) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                message: "the optimizer state (optimizer.safetensors) is missing".into(),
            });
        }
        let tensors = candle_core::safetensors::load(path, device)?;
        let mut opt = Self::new(config);
        let (mut ms, mut vs) = (HashMap::new(), HashMap::new());
        for (k, t) in &tensors {
            if let Some(name) = k.strip_prefix("exp_avg.") {
                ms.insert(name.to_string(), t.clone());
            } else if let Some(name) = k.strip_prefix("exp_avg_sq.") {
                vs.insert(name.to_string(), t.clone());
            } else if let Some(name) = k.strip_prefix("step.") {
                let s: Vec<f64> = t.to_device(&Device::Cpu)?.to_vec1()?;
                opt.steps.insert(name.to_string(), s[0] as u64);
            }
        }
        for (k, m) in ms {
            let v = vs.remove(&k);
            match v {
                Some(v) if opt.steps.contains_key(&k) && v.shape() == m.shape() => {
                    opt.moments.insert(k, Moments::Tensors { m, v });
                }
                _ => {
                    return Err(Error::Checkpoint {
                        path: path.to_path_buf(),
                        message: format!("incomplete optimizer state for parameter {k}"),
                    })
                }
            }
        }
        if let Some(k) = vs.keys().next() {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!("incomplete optimizer state for parameter {k}"),
            });
        }
        Ok(opt)
    }
}

/// The learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear decay to 0 at the last step (the Trainer's default).
    #[default]
    Linear,
    /// Constant after warm-up.
    Constant,
    /// Half-cosine decay to 0.
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Self::Linear),
            "constant" | "constant_with_warmup" => Ok(Self::Constant),
            "cosine" => Ok(Self::Cosine),
            o => Err(Error::Invalid(format!(
                "unknown learning-rate schedule {o:?} (expected linear, constant or cosine)"
            ))),
        }
    }
}

/// The learning rate of optimisation step `step` (0-based) out of `total`, after `warmup` warm-up steps,
/// as the `transformers` schedulers give it (`get_linear_schedule_with_warmup`, ...).
pub fn learning_rate(base: f64, schedule: Schedule, step: u64, warmup: u64, total: u64) -> f64 {
    let (s, w, t) = (step as f64, warmup as f64, total as f64);
    if step < warmup {
        return base * s / w.max(1.0);
    }
    let progress = (s - w) / (t - w).max(1.0);
    base * match schedule {
        Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
        Schedule::Constant => 1.0,
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, capped at 1). Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}
