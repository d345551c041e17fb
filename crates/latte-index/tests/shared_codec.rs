//! Indexes built with one shared codec (`PlaidIndex::train_codec`, `PlaidIndex::create_with_codec`,
//! `IndexCodec`): the normal build is training plus a build with the trained codec, byte for byte; shards that
//! share a codec answer, merged, what one index with that codec answers.

use std::borrow::Cow;
use std::path::Path;

use latte_index::{
    default_num_centroids, DocumentSource, EmbRef, Error, Hit, IndexCodec, IndexConfig, PlaidIndex,
    SearchParams, SynthConfig, SyntheticSource,
};

fn synth(docs: usize) -> SyntheticSource {
    SyntheticSource::new(SynthConfig {
        docs,
        dim: 32,
        mean_tokens: 24,
        topics: 48,
        seed: 5,
        ..SynthConfig::default()
    })
    .unwrap()
}

/// The documents of `inner` at `rows` (a shard, or a sample).
struct Rows<'a> {
    inner: &'a dyn DocumentSource,
    rows: Vec<usize>,
}

impl DocumentSource for Rows<'_> {
    fn len(&self) -> usize {
        self.rows.len()
    }
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn id(&self, i: usize) -> String {
        self.inner.id(self.rows[i])
    }
    fn embeddings(&self, i: usize) -> latte_index::Result<Cow<'_, [f32]>> {
        self.inner.embeddings(self.rows[i])
    }
}

/// The index's vector files (`*.lt`), name and bytes.
fn lt_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".lt"))
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).unwrap();
            (n, bytes)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn create_is_train_codec_then_create_with_codec_byte_for_byte() {
    let src = synth(300);
    for config in [
        IndexConfig::default(),
        IndexConfig {
            nbits: 4,
            pool_factor: 2,
            seed: 9,
            ..IndexConfig::default()
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let normal = PlaidIndex::create(dir.path().join("normal"), &src, &config).unwrap();
        let codec = PlaidIndex::train_codec(&src, &config).unwrap();
        let shared =
            PlaidIndex::create_with_codec(dir.path().join("shared"), &src, &[], &codec, &config)
                .unwrap();
        assert!(normal.trained && !shared.trained);
        assert_eq!(normal.num_centroids, codec.num_centroids());
        assert_eq!(
            (normal.documents, normal.tokens),
            (shared.documents, shared.tokens)
        );
        let (a, b) = (
            lt_files(&dir.path().join("normal")),
            lt_files(&dir.path().join("shared")),
        );
        assert_eq!(
            a.iter().map(|f| &f.0).collect::<Vec<_>>(),
            b.iter().map(|f| &f.0).collect::<Vec<_>>()
        );
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert!(
                x == y,
                "{name} differs (pool_factor {})",
                config.pool_factor
            );
        }
        // The codec read back from the index is the one trained.
        assert_eq!(
            IndexCodec::from_index(dir.path().join("normal")).unwrap(),
            codec
        );
    }
}

fn merged_top(shards: &[PlaidIndex], q: EmbRef<'_>, params: &SearchParams) -> Vec<Hit> {
    let mut hits: Vec<Hit> = shards
        .iter()
        .flat_map(|s| s.search(q, params, None).unwrap())
        .collect();
    hits.sort_by(|a, b| b.score.total_cmp(&a.score));
    hits.truncate(params.k);
    hits
}

#[test]
fn shards_sharing_a_codec_answer_as_one_index_with_it() {
    let src = synth(600);
    let dim = src.dim();
    let config = IndexConfig::default();
    // The codec is trained on a sample of a third of the documents, with the number of centroids of the whole
    // collection.
    let sample = Rows {
        inner: &src,
        rows: (0..src.len()).step_by(3).collect(),
    };
    let codec = PlaidIndex::train_codec(
        &sample,
        &IndexConfig {
            num_centroids: Some(default_num_centroids(src.total_tokens())),
            ..config.clone()
        },
    )
    .unwrap();
    assert_eq!(
        codec.num_centroids(),
        default_num_centroids(src.total_tokens())
    );
    let dir = tempfile::tempdir().unwrap();
    PlaidIndex::create_with_codec(dir.path().join("one"), &src, &[], &codec, &config).unwrap();
    let one = PlaidIndex::open(dir.path().join("one")).unwrap();
    let mut shards = Vec::new();
    for s in 0..3 {
        let part = Rows {
            inner: &src,
            rows: (0..src.len()).filter(|i| i % 3 == s).collect(),
        };
        let path = dir.path().join(format!("shard-{s}"));
        PlaidIndex::create_with_codec(&path, &part, &[], &codec, &config).unwrap();
        assert_eq!(IndexCodec::from_index(&path).unwrap(), codec);
        shards.push(PlaidIndex::open(&path).unwrap());
    }
    let params = SearchParams::for_k(10);
    let mut equal = 0;
    for qi in 0..60 {
        let (q, _) = src.query(qi, 8);
        let q = EmbRef::new(&q, dim).unwrap();
        let want = one.search(q, &params, None).unwrap();
        let got = merged_top(&shards, q, &params);
        assert_eq!(want.len(), 10);
        let ids = |h: &[Hit]| h.iter().map(|x| x.id.clone()).collect::<Vec<_>>();
        if ids(&want) == ids(&got) {
            equal += 1;
        }
        // Scores are the exact rerank's: equal for every rank, whatever the tie order.
        for (a, b) in want.iter().zip(&got) {
            assert!(
                (a.score - b.score).abs() <= 1e-5,
                "query {qi}: {a:?} vs {b:?}"
            );
        }
    }
    assert_eq!(equal, 60, "top-10 equal for {equal} of 60 queries");
}

#[test]
fn codec_saves_loads_and_rebuilds_from_its_arrays() {
    let src = synth(120);
    let codec = PlaidIndex::train_codec(&src, &IndexConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("codec.lt");
    codec.save(&path).unwrap();
    assert_eq!(IndexCodec::load(&path).unwrap(), codec);
    let again = IndexCodec::new(
        codec.dim(),
        codec.nbits(),
        &codec.centroids(),
        codec.cutoffs().to_vec(),
        codec.weights().to_vec(),
        codec.cluster_threshold(),
    )
    .unwrap();
    assert_eq!(again, codec);
    // A damaged file is named.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = IndexCodec::load(&path).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { .. }) && err.to_string().contains("codec.lt"),
        "{err}"
    );
    // An index folder is not a codec file, and a codec file is not an index.
    assert!(IndexCodec::from_index(dir.path()).is_err());
}

#[test]
fn arrays_or_settings_that_do_not_fit_are_named() {
    let src = synth(120);
    let codec = PlaidIndex::train_codec(&src, &IndexConfig::default()).unwrap();
    let (dim, c) = (codec.dim(), codec.centroids());
    let cases: Vec<(&str, latte_index::Result<IndexCodec>)> = vec![
        (
            "nbits",
            IndexCodec::new(dim, 3, &c, vec![0.0; 3], vec![0.0; 4], 0.1),
        ),
        (
            "dim",
            IndexCodec::new(12, 2, &c, vec![0.0; 3], vec![0.0; 4], 0.1),
        ),
        (
            "centroids",
            IndexCodec::new(dim, 2, &c[1..], vec![0.0; 3], vec![0.0; 4], 0.1),
        ),
        (
            "cutoffs",
            IndexCodec::new(dim, 2, &c, vec![0.0; 2], vec![0.0; 4], 0.1),
        ),
        (
            "cutoffs",
            IndexCodec::new(dim, 2, &c, vec![0.5, 0.0, 1.0], vec![0.0; 4], 0.1),
        ),
        (
            "weights",
            IndexCodec::new(dim, 2, &c, vec![0.0; 3], vec![f32::NAN; 4], 0.1),
        ),
        (
            "cluster_threshold",
            IndexCodec::new(dim, 2, &c, vec![0.0; 3], vec![0.0; 4], -1.0),
        ),
    ];
    for (name, got) in cases {
        let err = got.unwrap_err();
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
    // A build whose settings differ from the codec's is refused before anything is written.
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        (
            "nbits",
            IndexConfig {
                nbits: 4,
                ..IndexConfig::default()
            },
        ),
        (
            "num_centroids",
            IndexConfig {
                num_centroids: Some(codec.num_centroids() + 1),
                ..IndexConfig::default()
            },
        ),
    ];
    for (name, config) in bad {
        let err = PlaidIndex::create_with_codec(dir.path().join("x"), &src, &[], &codec, &config)
            .unwrap_err();
        assert!(err.to_string().contains(name), "{name}: {err}");
        assert!(!dir.path().join("x").join("meta.lt").exists());
    }
    let other = SyntheticSource::new(SynthConfig {
        docs: 10,
        dim: 16,
        ..SynthConfig::default()
    })
    .unwrap();
    let err = PlaidIndex::create_with_codec(
        dir.path().join("y"),
        &other,
        &[],
        &codec,
        &IndexConfig::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("dimension 16"), "{err}");
}
