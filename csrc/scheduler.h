// Continuous-batching scheduler over a paged KV cache (host side, no torch dependency).
//
// A request is one prompt of `prompt_len` tokens that yields `num_samples` independent
// samples of up to `max_new_tokens` tokens. With classifier-free guidance (cfg=true) every
// request also owns an unconditional prompt of the same length (the Janus / LlamaGen layout:
// the prompt with its content tokens replaced by padding), and every sample is a pair of
// rows (conditional, unconditional) that decode in lock step.
//
// Batch layout (batch doubling): in a plan, the prefill sequences are all conditional
// prompts first, then (cfg) the unconditional ones in the same order; the decode rows are
// all conditional sample rows, then (cfg) their unconditional partners in the same order.
// So logits[:R] are conditional and logits[R:] unconditional, as `u + s*(c-u)` expects.
//
// Admission reserves the worst case of a request (prompt plus every future token of every
// sample, copy-on-write copies included) before it starts, so an admitted request can never
// run out of KV blocks mid-generation; requests are admitted strictly in FIFO order.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block_manager.h"

namespace pgen {

struct PrefillItem {
  int64_t request_id = -1;
  int64_t prompt_len = 0;
  int64_t seq_id = -1;         // conditional prompt sequence (== sample_seq_ids[0])
  int64_t uncond_seq_id = -1;  // unconditional prompt sequence, -1 without cfg
  std::vector<int64_t> sample_seq_ids;         // one per sample, forked from seq_id
  std::vector<int64_t> uncond_sample_seq_ids;  // cfg only, aligned with sample_seq_ids
};

struct BatchPlan {
  // Prefill: run the prompts of these sequences, writing their K/V at prefill_slot_mapping
  // (concatenated in prefill_seq_ids order).
  std::vector<PrefillItem> prefill;
  std::vector<int64_t> prefill_seq_ids;
  std::vector<int64_t> prefill_lens;
  std::vector<int64_t> prefill_slot_mapping;
  // Decode: one new token per row; `decode_sample_ids` are the conditional rows (= the ids
  // step_done expects), `decode_seq_ids` every model row (conditional then unconditional).
  std::vector<int64_t> decode_sample_ids;
  std::vector<int64_t> decode_seq_ids;
  std::vector<int64_t> decode_slot_mapping;  // [rows]
  std::vector<int32_t> decode_context_lens;  // [rows], includes the token written this step
  std::vector<int32_t> decode_block_tables;  // row-major [rows, decode_max_blocks], 0-padded
  int64_t decode_max_blocks = 0;
  // Copy-on-write block copies to run on every layer's cache BEFORE this step's writes.
  std::vector<std::pair<int32_t, int32_t>> copies;  // (src, dst)
};

struct SchedulerStats {
  int64_t num_blocks = 0;
  int64_t num_free_blocks = 0;
  int64_t reserved_blocks = 0;
  int64_t num_waiting = 0;
  int64_t num_running_requests = 0;
  int64_t num_running_rows = 0;
  int64_t num_pending_samples = 0;
};

struct SampleInfo {
  int64_t request_id = -1;
  int64_t sample_index = -1;
  int64_t uncond_seq_id = -1;
  int64_t num_generated = 0;
};

class Scheduler {
 public:
  Scheduler(int64_t num_blocks, int64_t block_size, int64_t max_batch_rows, bool cfg);

  // Worst-case number of KV blocks of a request (both cfg halves included), saturated at
  // INT64_MAX. Throws std::invalid_argument unless every size is >= 1.
  int64_t worst_case_blocks(int64_t prompt_len, int64_t num_samples,
                            int64_t max_new_tokens) const;
  // Queue a request. Throws std::invalid_argument on bad sizes (non-positive, more rows than
  // max_batch_rows, or a context longer than the int32 decode_context_lens hold), StateError
  // on a duplicate id, OutOfBlocksError when its worst case exceeds the whole pool (it could
  // never run).
  void add_request(int64_t request_id, int64_t prompt_len, int64_t num_samples,
                   int64_t max_new_tokens);
  // Next batch. Throws StateError while samples of the previous plan are not reported.
  BatchPlan schedule();
  // Report the samples that produced one token this step (their conditional ids) and
  // whether each finished (EOS). A sample also finishes at max_new_tokens. Finished samples
  // free their blocks. Returns the ids of requests whose last sample finished.
  std::vector<int64_t> step_done(const std::vector<int64_t>& sample_ids,
                                 const std::vector<bool>& finished);
  // Drop a waiting or running request, freeing everything it holds.
  void abort(int64_t request_id);

  SchedulerStats stats() const;
  SampleInfo sample_info(int64_t sample_id) const;
  bool has_unfinished() const { return !waiting_.empty() || !running_.empty(); }
  bool cfg() const { return cfg_; }
  int64_t max_batch_rows() const { return max_batch_rows_; }
  const BlockManager& block_manager() const { return bm_; }

 private:
  struct Request {
    int64_t id;
    int64_t prompt_len;
    int64_t num_samples;
    int64_t max_new_tokens;
    int64_t shared_blocks;      // full prompt blocks shared by all samples (one cfg half)
    int64_t per_sample_blocks;  // worst-case private blocks of one sample (one cfg half)
    int64_t need_blocks;        // worst_case_blocks(): what admission reserves (<= pool)
    int64_t alive = 0;
  };
  struct Sample {
    int64_t request_id;
    int64_t index;
    int64_t uncond_seq;
    int64_t generated = 0;
    bool pending = false;
  };
  int64_t halves() const { return cfg_ ? 2 : 1; }
  void check_sizes(const std::string& who, int64_t prompt_len, int64_t num_samples,
                   int64_t max_new_tokens) const;
  void finish_sample(int64_t sample_id, std::vector<int64_t>& completed);
  bool is_known_request(int64_t request_id) const;

  BlockManager bm_;
  int64_t max_batch_rows_;
  bool cfg_;
  int64_t next_seq_ = 0;
  int64_t reserved_ = 0;
  int64_t running_rows_ = 0;
  int64_t num_pending_ = 0;
  std::deque<Request> waiting_;
  std::unordered_map<int64_t, Request> running_;
  std::unordered_map<int64_t, Sample> samples_;  // key: conditional sample sequence id
  std::vector<int64_t> order_;                   // live sample ids in admission order
};

}  // namespace pgen
