//! `latte train`: fine-tune a ColBERT model with PyLate's losses.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use latte_eval::BeirDataset;
use latte_train::data::{Table, TrainingData};
use latte_train::evaluate::{DistillationEvaluator, Evaluator, IrEvaluator, TripletEvaluator};
use latte_train::{LossKind, Schedule, TrainConfig, Trainer};

use super::model_args::ModelArgs;

/// Fine-tune a model (flags override the TOML config file, which overrides the defaults).
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: .jsonl or .parquet. Columns: a query (`query`/`anchor` in the name), then
    /// `positive`, `negative`, `negative_1`...; for distillation `query`, `documents` (list) and `scores`,
    /// or PyLate's layout `query_id`, `document_ids`, `scores` with --queries and --documents.
    #[arg(long)]
    pub train: PathBuf,
    /// Distillation, PyLate layout: the queries table (`query_id`, `text`).
    #[arg(long, requires = "documents")]
    pub queries: Option<PathBuf>,
    /// Distillation, PyLate layout: the documents table (`document_id`, `text`).
    #[arg(long, requires = "queries")]
    pub documents: Option<PathBuf>,
    /// contrastive, cached-contrastive or distillation.
    #[arg(long)]
    pub loss: Option<String>,
    /// Output folder: the trained model (a PyLate folder), checkpoints/ and metrics.jsonl.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// TOML file with any training setting (keys as in TrainConfig: batch_size, learning_rate, ...).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Rows per forward/backward pass.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Passes whose gradients are averaged into one step.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many optimisation steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long, visible_alias = "lr")]
    pub learning_rate: Option<f64>,
    /// AdamW weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Warm-up as a fraction of all steps.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Warm-up steps (overrides --warmup-ratio).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// linear, constant or cosine.
    #[arg(long)]
    pub lr_scheduler: Option<String>,
    /// Gradient clipping by global norm (0 = off).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Contrastive temperature.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// CachedContrastive: texts per forward pass.
    #[arg(long)]
    pub mini_batch_size: Option<usize>,
    /// Distillation: documents per query (PyLate layout).
    #[arg(long)]
    pub n_ways: Option<usize>,
    /// Distillation: do not min-max normalise the student scores.
    #[arg(long)]
    pub no_normalize_scores: bool,
    /// Train without dropout (by default the model config's dropout applies, as in PyTorch training).
    #[arg(long)]
    pub no_dropout: bool,
    /// Seed of the data shuffling and dropout.
    #[arg(long)]
    pub train_seed: Option<u64>,
    /// Log every N steps.
    #[arg(long)]
    pub logging_steps: Option<u64>,
    /// Evaluate every N steps (and at the end).
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// Checkpoint every N steps.
    #[arg(long)]
    pub save_steps: Option<u64>,
    /// Keep only the newest N checkpoints.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Evaluate triplet accuracy on this table (query, positive, negative columns).
    #[arg(long)]
    pub eval_triplets: Option<PathBuf>,
    /// Evaluate distillation KL divergence on this table (query, documents, scores).
    #[arg(long)]
    pub eval_distillation: Option<PathBuf>,
    /// Evaluate IR metrics (nDCG@10, ...) on this BEIR folder.
    #[arg(long)]
    pub eval_beir: Option<PathBuf>,
    /// Qrels split of --eval-beir.
    #[arg(long, default_value = "dev")]
    pub eval_split: String,
    /// Resume from this checkpoint folder (model, optimizer and position in the data).
    #[arg(long, conflicts_with = "resume")]
    pub resume_from_checkpoint: Option<PathBuf>,
    /// Resume from the newest checkpoint in the output folder.
    #[arg(long)]
    pub resume: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

fn config(args: &TrainArgs) -> Result<TrainConfig> {
    let mut c = match &args.config {
        Some(p) => TrainConfig::from_toml(
            &std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("in {}", p.display()))?,
        None => TrainConfig::default(),
    };
    macro_rules! set {
        ($($f:ident),*) => {$( if let Some(v) = args.$f.clone() { c.$f = v; } )*};
    }
    set!(
        batch_size,
        gradient_accumulation_steps,
        epochs,
        learning_rate,
        weight_decay,
        warmup_ratio,
        warmup_steps,
        max_grad_norm,
        temperature,
        mini_batch_size,
        n_ways,
        logging_steps
    );
    if let Some(v) = args.save_total_limit {
        c.save_total_limit = Some(v);
    }
    if let Some(v) = args.max_steps {
        c.max_steps = Some(v);
    }
    // `--dtype bf16`: bf16 products forward and backward (the TOML key `dtype` says the same).
    if let Some(d) = args.model.settings.dtype {
        c.dtype = Some(d);
    }
    if let Some(v) = args.eval_steps {
        c.eval_steps = Some(v);
    }
    if let Some(v) = args.save_steps {
        c.save_steps = Some(v);
    }
    if let Some(v) = args.train_seed {
        c.seed = v;
    }
    if let Some(l) = &args.loss {
        c.loss = l.parse::<LossKind>()?;
    }
    if let Some(s) = &args.lr_scheduler {
        c.lr_scheduler = s.parse::<Schedule>()?;
    }
    if args.no_dropout {
        c.dropout = false;
    }
    if args.no_normalize_scores {
        c.normalize_scores = false;
    }
    if let Some(o) = &args.output {
        c.output_dir = o.clone();
    } else if args.config.is_none() {
        bail!("--output is required (or output_dir in --config)");
    }
    Ok(c)
}

pub fn run(args: TrainArgs) -> Result<()> {
    let cfg = config(&args)?;
    let data = match (&args.queries, &args.documents) {
        (Some(q), Some(d)) => TrainingData::distillation(
            &Table::read(&args.train)?,
            &Table::read(q)?,
            &Table::read(d)?,
            cfg.n_ways,
        )?,
        _ => TrainingData::load(&args.train)?,
    };
    match cfg.loss {
        LossKind::Distillation if data.label_column.is_none() => bail!(
            "{}: the distillation loss needs teacher scores (a `scores` column); columns: {:?}",
            args.train.display(),
            data.text_columns
        ),
        LossKind::Contrastive | LossKind::CachedContrastive if data.list_columns.iter().any(|&l| l) => bail!(
            "{}: the contrastive losses need one text per column (query, positive, negatives); a list-valued column is distillation data (use --loss distillation)",
            args.train.display()
        ),
        _ => {}
    }
    let mut evaluators: Vec<Box<dyn Evaluator>> = Vec::new();
    if let Some(p) = &args.eval_triplets {
        evaluators.push(Box::new(TripletEvaluator::from_data(
            "triplets",
            &TrainingData::load(p)?,
        )?));
    }
    if let Some(p) = &args.eval_distillation {
        evaluators.push(Box::new(DistillationEvaluator::from_data(
            "distillation",
            &TrainingData::load(p)?,
        )?));
    }
    if let Some(p) = &args.eval_beir {
        let ds = BeirDataset::load(p, &args.eval_split)
            .with_context(|| format!("loading the evaluation set {}", p.display()))?;
        evaluators.push(Box::new(IrEvaluator::new("ir", ds)?));
    }
    let resume = if args.resume {
        let latest = latte_train::trainer::latest_checkpoint(&cfg.output_dir);
        if latest.is_none() {
            bail!(
                "--resume: no complete checkpoint in {}",
                cfg.output_dir.join("checkpoints").display()
            );
        }
        latest
    } else {
        args.resume_from_checkpoint.clone()
    };
    let model = if resume.is_some() {
        None
    } else {
        Some(args.model.load()?)
    };
    eprintln!(
        "training on {} examples ({} loss, batch {}, lr {:e}) → {}",
        data.len(),
        match cfg.loss {
            LossKind::Contrastive => "contrastive",
            LossKind::CachedContrastive => "cached-contrastive",
            LossKind::Distillation => "distillation",
        },
        cfg.batch_size,
        cfg.learning_rate,
        cfg.output_dir.display()
    );
    let trainer = Trainer {
        config: cfg,
        evaluators,
    };
    let base = match (&model, &resume) {
        (Some(m), _) => m.clone(),
        (None, Some(dir)) => latte_models::ColBERT::load_dir(dir, &Default::default())
            .with_context(|| format!("loading checkpoint {}", dir.display()))?,
        (None, None) => unreachable!(),
    };
    let out = trainer.train(&base, &data, resume.as_deref())?;
    if args.json {
        let eval: serde_json::Map<String, serde_json::Value> = out
            .last_eval
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "steps": out.global_step, "loss": out.last_loss,
                "examples_per_second": out.examples_per_second, "eval": eval,
                "model": out.model_dir,
            })
        );
    } else {
        println!(
            "{} steps, final loss {:.4}, {:.2} examples/s; model written to {}",
            out.global_step,
            out.last_loss,
            out.examples_per_second,
            out.model_dir.display()
        );
        for (k, v) in &out.last_eval {
            println!("  {k:<28} {v:.4}");
        }
    }
    Ok(())
}
