//! The learned predictor: embedding → GRU → linear over the active
//! vocabulary, on libtorch through tch. This is the only file that imports
//! tch (docs/ARCHITECTURE.md, "Prediction").
//!
//! Vocabulary: the model has `capacity` output slots. Slot 0 is the
//! out-of-vocabulary bucket (and the left padding of short histories); every
//! other slot holds one resource. A new resource takes a free slot; when none
//! is free it takes the slot of the resource seen longest ago, whose
//! embedding and output rows are re-initialised, so the vocabulary follows
//! what is in use without ever resizing the network. Unassigned slots are
//! masked out of predictions.
//!
//! Training is online: every `train_every` observations (or when the daemon
//! asks) a round of `steps` Adam steps runs on batches of windows, half drawn
//! from the most recent windows and half from the whole bounded buffer.

use super::predict::{sort_top, Predictor, Ranked};
use super::{SplitMix, Sym};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use tch::nn::{self, Module, OptimizerConfig, RNN};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct GruConfig {
    pub embed: i64,
    pub hidden: i64,
    /// History length the model sees (the last `context` opens).
    pub context: usize,
    /// Output slots, the out-of-vocabulary bucket included.
    pub capacity: usize,
    /// Observations between automatic training rounds (0: only `train_round`).
    pub train_every: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// Training windows kept (bounded memory: `context + 1` symbols each).
    pub buffer: usize,
    pub seed: u64,
}

impl Default for GruConfig {
    fn default() -> Self {
        Self {
            embed: 64,
            hidden: 128,
            context: 16,
            capacity: 2048,
            train_every: 128,
            steps: 6,
            batch: 32,
            lr: 0.01,
            buffer: 20_000,
            seed: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Everything but the weights, saved beside them: which resource each slot
/// holds (as the caller's keys) and the shape the weights must have.
#[derive(serde::Serialize, serde::Deserialize)]
struct VocabFile<K> {
    embed: i64,
    hidden: i64,
    capacity: usize,
    slots: Vec<Option<K>>,
}

pub struct Gru {
    cfg: GruConfig,
    vs: nn::VarStore,
    emb: nn::Embedding,
    rnn: nn::GRU,
    out: nn::Linear,
    opt: nn::Optimizer,
    /// 0 for assigned slots, a large negative number for free ones.
    mask: Tensor,
    slot_of: HashMap<Sym, i64>,
    sym_of: Vec<Option<Sym>>,
    last_seen: Vec<u64>,
    clock: u64,
    windows: VecDeque<Vec<Sym>>,
    since_train: usize,
    rng: SplitMix,
    /// Mean loss of each training round, oldest first (bounded).
    pub losses: VecDeque<f32>,
    /// Predictions already made with the current weights and vocabulary,
    /// by context (`MEMO_TOP` each). The daemon asks for the same context
    /// twice, to plan after an open and to score the next open of that
    /// stream, and the GRU's steps are its whole cost. Emptied whenever
    /// the weights, the mask or the slots change, so a remembered answer is
    /// exactly what the model would compute.
    memo: HashMap<Vec<i64>, Ranked>,
}

/// Candidates remembered per context: as many as any caller asks for.
const MEMO_TOP: usize = 8;
/// Contexts remembered at most (about 1 MiB); past it the memo starts
/// over.
const MEMO_MAX: usize = 4096;

impl std::fmt::Debug for Gru {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gru")
            .field("cfg", &self.cfg)
            .field("assigned", &self.slot_of.len())
            .finish()
    }
}

const MASKED: f64 = -1e9;

/// Debian's libtorch does its matrix products in OpenBLAS, which keeps its
/// own pool of one worker per core (tch::set_num_threads does not reach
/// it). Between calls those workers spin in sched_yield: measured in the
/// daemon, a third of its CPU while files were being created, taken from
/// the kernel request threads on a 2-core machine, and each small product
/// paid the hand-off. One thread keeps training on one core, as promised.
/// Looked up at run time because the symbol exists only when the BLAS
/// behind libtorch is OpenBLAS (another BLAS is left as it is).
fn single_threaded_blas() {
    // SAFETY: dlsym is given a NUL-terminated name. When the symbol exists
    // it is OpenBLAS's `void openblas_set_num_threads(int)`, so the
    // transmuted signature matches, and it may be called at any time.
    unsafe {
        let f = libc::dlsym(libc::RTLD_DEFAULT, c"openblas_set_num_threads".as_ptr());
        if !f.is_null() {
            let set: extern "C" fn(libc::c_int) = std::mem::transmute(f);
            set(1);
        }
    }
}

impl Gru {
    pub fn new(cfg: GruConfig) -> Result<Self, ModelError> {
        // One thread: single predictions were 30× slower with libtorch's
        // default pool on two busy cores, and training must stay on one core.
        tch::set_num_threads(1);
        single_threaded_blas();
        tch::manual_seed(cfg.seed as i64);
        let capacity = cfg.capacity.max(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let emb = nn::embedding(
            &root / "emb",
            capacity as i64,
            cfg.embed,
            Default::default(),
        );
        let rnn = nn::gru(&root / "gru", cfg.embed, cfg.hidden, Default::default());
        let out = nn::linear(
            &root / "out",
            cfg.hidden,
            capacity as i64,
            Default::default(),
        );
        let opt = nn::Adam::default().build(&vs, cfg.lr)?;
        let mask = Tensor::full(&[capacity as i64], MASKED, (Kind::Float, Device::Cpu));
        Ok(Self {
            cfg: GruConfig { capacity, ..cfg },
            vs,
            emb,
            rnn,
            out,
            opt,
            mask,
            slot_of: HashMap::new(),
            sym_of: vec![None; capacity],
            last_seen: vec![0; capacity],
            clock: 0,
            windows: VecDeque::new(),
            since_train: 0,
            rng: SplitMix::new(cfg.seed),
            losses: VecDeque::new(),
            memo: HashMap::new(),
        })
    }

    pub fn config(&self) -> &GruConfig {
        &self.cfg
    }

    /// Forgets remembered predictions, so the next ones are computed (for
    /// timing the model itself).
    pub fn forget_predictions(&mut self) {
        self.memo.clear();
    }

    /// Resources currently holding a slot.
    pub fn vocabulary(&self) -> usize {
        self.slot_of.len()
    }

    /// The slot for `sym`, assigning (or recycling) one if it has none.
    fn assign(&mut self, sym: Sym) -> i64 {
        self.clock += 1;
        if let Some(&slot) = self.slot_of.get(&sym) {
            self.last_seen[slot as usize] = self.clock;
            return slot;
        }
        let slot = match self.sym_of.iter().skip(1).position(Option::is_none) {
            Some(free) => free + 1,
            None => {
                // Recycle the slot seen longest ago.
                let oldest = (1..self.cfg.capacity)
                    .min_by_key(|&i| self.last_seen[i])
                    .unwrap_or(1);
                if let Some(old) = self.sym_of[oldest].take() {
                    self.slot_of.remove(&old);
                }
                self.reset_slot(oldest as i64);
                oldest
            }
        };
        self.memo.clear();
        self.sym_of[slot] = Some(sym);
        self.slot_of.insert(sym, slot as i64);
        self.last_seen[slot] = self.clock;
        tch::no_grad(|| {
            let _ = self.mask.get(slot as i64).fill_(0.0);
        });
        slot as i64
    }

    /// A recycled slot starts fresh: what its old resource taught must not
    /// leak into the new one's predictions.
    fn reset_slot(&mut self, slot: i64) {
        tch::no_grad(|| {
            let fresh = Tensor::randn(&[self.cfg.embed], (Kind::Float, Device::Cpu));
            self.emb.ws.get(slot).copy_(&fresh);
            let _ = self.out.ws.get(slot).zero_();
            if let Some(bs) = &self.out.bs {
                let _ = bs.get(slot).zero_();
            }
        });
    }

    fn slot(&self, sym: Sym) -> i64 {
        self.slot_of.get(&sym).copied().unwrap_or(0)
    }

    /// The last `context` slots of `history`, left-padded with slot 0.
    fn context_slots(&self, history: &[Sym]) -> Vec<i64> {
        let n = self.cfg.context;
        let tail = &history[history.len().saturating_sub(n)..];
        let mut slots = vec![0i64; n - tail.len()];
        slots.extend(tail.iter().map(|&s| self.slot(s)));
        slots
    }

    fn logits(&self, input: &Tensor) -> Tensor {
        let (seq, _) = self.rnn.seq(&self.emb.forward(input));
        self.out.forward(&seq)
    }

    /// One round of training; returns its mean loss (None with nothing to
    /// learn from yet).
    pub fn train_round(&mut self) -> Option<f32> {
        self.since_train = 0;
        self.memo.clear();
        if self.windows.is_empty() {
            return None;
        }
        let width = self.cfg.context + 1;
        let recent = self.windows.len().min(512) as u64;
        let mut total = 0.0;
        for _ in 0..self.cfg.steps {
            let mut flat: Vec<i64> = Vec::with_capacity(self.cfg.batch * width);
            for i in 0..self.cfg.batch {
                let len = self.windows.len() as u64;
                let idx = if i % 2 == 0 {
                    len - 1 - self.rng.below(recent)
                } else {
                    self.rng.below(len)
                } as usize;
                let w = &self.windows[idx];
                flat.extend(std::iter::repeat_n(0, width - w.len()));
                flat.extend(w.iter().map(|&s| self.slot(s)));
            }
            let batch = Tensor::of_slice(&flat).view([self.cfg.batch as i64, width as i64]);
            let input = batch.narrow(1, 0, width as i64 - 1);
            let target = batch.narrow(1, 1, width as i64 - 1).reshape(&[-1]);
            let logits = self.logits(&input).reshape(&[-1, self.cfg.capacity as i64]);
            let loss = logits.cross_entropy_for_logits(&target);
            self.opt.backward_step_clip_norm(&loss, 1.0);
            total += loss.double_value(&[]) as f32;
        }
        let mean = total / self.cfg.steps.max(1) as f32;
        if self.losses.len() == 4096 {
            self.losses.pop_front();
        }
        self.losses.push_back(mean);
        Some(mean)
    }

    /// Mean cross-entropy of the model on the buffered windows (no learning),
    /// for tests and the harness.
    pub fn loss_now(&self) -> Option<f32> {
        if self.windows.is_empty() {
            return None;
        }
        let width = self.cfg.context + 1;
        let take = self.windows.len().min(256);
        let mut flat = Vec::with_capacity(take * width);
        for w in self.windows.iter().rev().take(take) {
            flat.extend(std::iter::repeat_n(0, width - w.len()));
            flat.extend(w.iter().map(|&s| self.slot(s)));
        }
        tch::no_grad(|| {
            let batch = Tensor::of_slice(&flat).view([take as i64, width as i64]);
            let input = batch.narrow(1, 0, width as i64 - 1);
            let target = batch.narrow(1, 1, width as i64 - 1).reshape(&[-1]);
            let logits = self.logits(&input).reshape(&[-1, self.cfg.capacity as i64]);
            Some(logits.cross_entropy_for_logits(&target).double_value(&[]) as f32)
        })
    }

    /// Saves weights and vocabulary (as the caller's keys) beside each other;
    /// each file is written to a temporary name and renamed, so a crash never
    /// leaves a half-written checkpoint under the real name.
    pub fn save<K: serde::Serialize>(
        &self,
        dir: &Path,
        key_of: impl Fn(Sym) -> Option<K>,
    ) -> Result<(), ModelError> {
        let err = |msg: String| ModelError::Checkpoint {
            path: dir.display().to_string(),
            msg,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let weights = dir.join("gru.ot");
        let tmp = dir.join("gru.ot.tmp");
        self.vs.save(&tmp)?;
        let vocab = VocabFile {
            embed: self.cfg.embed,
            hidden: self.cfg.hidden,
            capacity: self.cfg.capacity,
            slots: self.sym_of.iter().map(|s| s.and_then(&key_of)).collect(),
        };
        let bytes = postcard::to_allocvec(&vocab).map_err(|e| err(e.to_string()))?;
        let vtmp = dir.join("gru.vocab.tmp");
        std::fs::write(&vtmp, bytes).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &weights).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&vtmp, dir.join("gru.vocab")).map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    /// Loads a checkpoint written by `save` into a fresh model of the same
    /// configuration. Any mismatch or damage is an error (the caller falls
    /// back to the count-based predictors and says so).
    pub fn load<K: serde::de::DeserializeOwned>(
        cfg: GruConfig,
        dir: &Path,
        mut sym_of: impl FnMut(K) -> Sym,
    ) -> Result<Self, ModelError> {
        let err = |msg: String| ModelError::Checkpoint {
            path: dir.display().to_string(),
            msg,
        };
        let bytes = std::fs::read(dir.join("gru.vocab")).map_err(|e| err(e.to_string()))?;
        let vocab: VocabFile<K> =
            postcard::from_bytes(&bytes).map_err(|e| err(format!("vocabulary: {e}")))?;
        if vocab.embed != cfg.embed
            || vocab.hidden != cfg.hidden
            || vocab.capacity != cfg.capacity.max(2)
        {
            return Err(err(format!(
                "shape {}x{}x{} does not match the configured {}x{}x{}",
                vocab.embed, vocab.hidden, vocab.capacity, cfg.embed, cfg.hidden, cfg.capacity
            )));
        }
        if vocab.slots.len() != vocab.capacity {
            return Err(err("vocabulary length does not match its capacity".into()));
        }
        let mut model = Self::new(cfg)?;
        model
            .vs
            .load(dir.join("gru.ot"))
            .map_err(|e| err(format!("weights: {e}")))?;
        for (slot, key) in vocab.slots.into_iter().enumerate().skip(1) {
            if let Some(key) = key {
                let sym = sym_of(key);
                if model.slot_of.contains_key(&sym) {
                    continue;
                }
                model.sym_of[slot] = Some(sym);
                model.slot_of.insert(sym, slot as i64);
                tch::no_grad(|| {
                    let _ = model.mask.get(slot as i64).fill_(0.0);
                });
            }
        }
        Ok(model)
    }
}

impl Predictor for Gru {
    fn name(&self) -> String {
        "gru".into()
    }

    fn observe(&mut self, history: &[Sym], next: Sym) {
        for &s in &history[history.len().saturating_sub(self.cfg.context)..] {
            if !self.slot_of.contains_key(&s) {
                self.assign(s);
            }
        }
        self.assign(next);
        let start = history.len().saturating_sub(self.cfg.context);
        let mut window = history[start..].to_vec();
        window.push(next);
        if self.windows.len() >= self.cfg.buffer.max(1) {
            self.windows.pop_front();
        }
        self.windows.push_back(window);
        self.since_train += 1;
        if self.cfg.train_every > 0 && self.since_train >= self.cfg.train_every {
            self.train_round();
        }
    }

    fn predict(&mut self, history: &[Sym], top: usize) -> Ranked {
        if history.is_empty() || self.slot_of.is_empty() || top == 0 {
            return Vec::new();
        }
        let slots = self.context_slots(history);
        if let Some(known) = self.memo.get(&slots) {
            if top <= MEMO_TOP {
                return known.iter().take(top).copied().collect();
            }
        }
        let want = top.max(MEMO_TOP);
        let (probs, idx) = tch::no_grad(|| {
            let input = Tensor::of_slice(&slots).view([1, slots.len() as i64]);
            // Only the last step's output is needed: the output layer
            // (hidden x capacity) runs once, not once per step.
            let (seq, _) = self.rnn.seq(&self.emb.forward(&input));
            let last = seq.select(1, slots.len() as i64 - 1).squeeze_dim(0);
            // A matrix-vector product, not Linear's matrix product: for one
            // row OpenBLAS's sgemm repacked the whole weight matrix on
            // every call (110 µs against 15 µs, measured). Probabilities
            // of the top k only: exp(logit - logsumexp) is the softmax.
            let mut logits = self.out.ws.mv(&last) + &self.mask;
            if let Some(b) = &self.out.bs {
                logits += b;
            }
            let lse = logits.logsumexp(&[0i64][..], false);
            let k = (want as i64).min(self.slot_of.len() as i64);
            let (top_logits, idx) = logits.topk(k, -1, true, true);
            ((top_logits - lse).exp(), idx)
        });
        let probs: Vec<f32> = Vec::from(&probs);
        let idx: Vec<i64> = Vec::from(&idx);
        let mut ranked: Ranked = idx
            .into_iter()
            .zip(probs)
            .filter_map(|(slot, p)| {
                self.sym_of
                    .get(slot as usize)
                    .copied()
                    .flatten()
                    .map(|s| (s, p))
            })
            .collect();
        sort_top(&mut ranked, want);
        if self.memo.len() >= MEMO_MAX {
            self.memo.clear();
        }
        self.memo.insert(slots, ranked.clone());
        ranked.truncate(top);
        ranked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> GruConfig {
        GruConfig {
            embed: 16,
            hidden: 32,
            context: 8,
            capacity: 16,
            train_every: 0,
            steps: 1,
            batch: 16,
            lr: 0.02,
            buffer: 1000,
            seed: 7,
        }
    }

    fn feed(g: &mut Gru, seq: &[Sym], rounds: usize) {
        let mut h: Vec<Sym> = Vec::new();
        for _ in 0..rounds {
            for &s in seq {
                g.observe(&h, s);
                h.push(s);
            }
        }
    }

    #[test]
    fn gru_learns_a_cycle_and_its_loss_falls() {
        let mut g = Gru::new(small()).unwrap();
        let seq = [1, 2, 3, 4, 5, 6, 7];
        feed(&mut g, &seq, 10);
        let before = g.loss_now().unwrap();
        for _ in 0..150 {
            g.train_round();
        }
        let after = g.loss_now().unwrap();
        assert!(after < before / 4.0, "loss {before} -> {after}");
        for i in 0..seq.len() {
            let history: Vec<Sym> = seq.iter().cycle().skip(i).take(9).copied().collect();
            let expect = seq[(i + 9) % seq.len()];
            assert_eq!(g.predict(&history, 1)[0].0, expect, "after {history:?}");
        }
    }

    #[test]
    fn remembered_predictions_are_what_the_model_computes() {
        let mut g = Gru::new(small()).unwrap();
        let seq = [1, 2, 3, 4, 5];
        feed(&mut g, &seq, 6);
        for _ in 0..20 {
            g.train_round();
        }
        let h: Vec<Sym> = vec![3, 4, 5, 1];
        let all = g.predict(&h, 16);
        let total: f32 = all.iter().map(|(_, p)| p).sum();
        assert!((total - 1.0).abs() < 1e-4, "probabilities sum to {total}");
        let first = g.predict(&h, 3);
        assert_eq!(first[..], all[..3]);
        assert!(!g.memo.is_empty());
        assert_eq!(g.predict(&h, 3), first, "remembered");
        g.memo.clear();
        assert_eq!(g.predict(&h, 3), first, "computed again");
        // New weights or a new slot: what was remembered is forgotten.
        g.train_round();
        assert!(g.memo.is_empty());
        g.predict(&h, 3);
        g.observe(&h, 42);
        assert!(g.memo.is_empty());
        // A resource seen before changes nothing.
        g.predict(&h, 3);
        g.observe(&h, 2);
        assert!(!g.memo.is_empty());
    }

    #[test]
    fn vocabulary_recycles_the_oldest_slot_and_masks_free_ones() {
        let mut g = Gru::new(small()).unwrap();
        feed(&mut g, &[100, 101], 1);
        let r = g.predict(&[100], 10);
        assert_eq!(r.len(), 2, "only assigned slots are predicted: {r:?}");
        for s in 0..40 {
            g.observe(&[], s);
        }
        assert_eq!(g.vocabulary(), 15);
        assert!(
            !g.slot_of.contains_key(&100),
            "the oldest resource gave its slot up"
        );
        assert!(g
            .predict(&[39], 20)
            .iter()
            .all(|(s, _)| (25..40).contains(s)));
    }

    #[test]
    fn checkpoint_round_trip_and_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Gru::new(small()).unwrap();
        let seq = [10, 20, 30, 40];
        feed(&mut g, &seq, 8);
        for _ in 0..100 {
            g.train_round();
        }
        let before = g.predict(&[10, 20], 3);
        g.save(dir.path(), |s| Some(u64::from(s) * 1000)).unwrap();
        let back = Gru::load::<u64>(small(), dir.path(), |k| (k / 1000) as Sym).unwrap();
        let mut back = back;
        let after = back.predict(&[10, 20], 3);
        assert_eq!(
            before.iter().map(|x| x.0).collect::<Vec<_>>(),
            after.iter().map(|x| x.0).collect::<Vec<_>>()
        );
        assert!((before[0].1 - after[0].1).abs() < 1e-5);
        // Another shape is refused, and so is a damaged weights file.
        assert!(Gru::load::<u64>(
            GruConfig {
                hidden: 64,
                ..small()
            },
            dir.path(),
            |k| k as Sym
        )
        .is_err());
        std::fs::write(dir.path().join("gru.ot"), b"not a checkpoint").unwrap();
        assert!(Gru::load::<u64>(small(), dir.path(), |k| k as Sym).is_err());
        std::fs::remove_file(dir.path().join("gru.vocab")).unwrap();
        assert!(Gru::load::<u64>(small(), dir.path(), |k| k as Sym).is_err());
    }
}
