#include "scheduler.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_set>

#include "errors.h"

namespace pgen {

namespace {
// Saturating arithmetic on non-negative int64 (sizes supplied by the caller may be huge; a
// wrapped product would look small and pass the admission checks).
int64_t sat_add(int64_t a, int64_t b) { return a > INT64_MAX - b ? INT64_MAX : a + b; }
int64_t sat_mul(int64_t a, int64_t b) {
  if (a == 0 || b == 0) return 0;
  return a > INT64_MAX / b ? INT64_MAX : a * b;
}
}  // namespace

Scheduler::Scheduler(int64_t num_blocks, int64_t block_size, int64_t max_batch_rows, bool cfg)
    : bm_(num_blocks, block_size), max_batch_rows_(max_batch_rows), cfg_(cfg) {
  if (max_batch_rows <= 0) {
    throw std::invalid_argument("Scheduler: max_batch_rows must be >= 1, got " +
                                std::to_string(max_batch_rows));
  }
}

void Scheduler::check_sizes(const std::string& who, int64_t prompt_len, int64_t num_samples,
                            int64_t max_new_tokens) const {
  if (prompt_len < 1) {
    throw std::invalid_argument(who + ": prompt_len must be >= 1, got " +
                                std::to_string(prompt_len));
  }
  if (num_samples < 1) {
    throw std::invalid_argument(who + ": num_samples must be >= 1, got " +
                                std::to_string(num_samples));
  }
  if (max_new_tokens < 1) {
    throw std::invalid_argument(who + ": max_new_tokens must be >= 1, got " +
                                std::to_string(max_new_tokens));
  }
}

int64_t Scheduler::worst_case_blocks(int64_t prompt_len, int64_t num_samples,
                                     int64_t max_new_tokens) const {
  check_sizes("worst_case_blocks", prompt_len, num_samples, max_new_tokens);
  const int64_t bs = bm_.block_size();
  // Full prompt blocks are never written again, so they stay shared by every sample; the
  // partial prompt block and everything after it may become private to each sample (the
  // last writer of a shared partial block keeps the original, the others copy it).
  const int64_t shared = prompt_len / bs;
  const int64_t per_sample =
      bm_.blocks_for_tokens(sat_add(prompt_len, max_new_tokens)) - shared;
  return sat_mul(halves(), sat_add(shared, sat_mul(num_samples, per_sample)));
}

bool Scheduler::is_known_request(int64_t request_id) const {
  if (running_.count(request_id)) return true;
  for (const Request& r : waiting_) {
    if (r.id == request_id) return true;
  }
  return false;
}

void Scheduler::add_request(int64_t request_id, int64_t prompt_len, int64_t num_samples,
                            int64_t max_new_tokens) {
  const std::string who = "add_request(request_id=" + std::to_string(request_id) + ")";
  check_sizes(who, prompt_len, num_samples, max_new_tokens);
  // num_samples * halves() can wrap for huge num_samples: compare by division.
  if (num_samples > max_batch_rows_ / halves()) {
    const std::string rows = num_samples > INT64_MAX / halves()
                                 ? std::string("more than 2^63-1")
                                 : std::to_string(num_samples * halves());
    throw std::invalid_argument(who + ": needs " + rows +
                                " batch rows (num_samples=" + std::to_string(num_samples) +
                                (cfg_ ? ", x2 for cfg" : "") + ") but max_batch_rows is " +
                                std::to_string(max_batch_rows_));
  }
  if (is_known_request(request_id)) {
    throw StateError(who + ": request id is already queued or running");
  }
  const int64_t need = worst_case_blocks(prompt_len, num_samples, max_new_tokens);
  if (need > bm_.num_blocks()) {
    throw OutOfBlocksError("out of KV blocks: need " +
                           (need == INT64_MAX ? std::string(">= 2^63-1") : std::to_string(need)) +
                           ", free " +
                           std::to_string(bm_.num_blocks()) + " — " + who +
                           " can never fit: its worst case (prompt " +
                           std::to_string(prompt_len) + " + " + std::to_string(max_new_tokens) +
                           " new tokens x " + std::to_string(num_samples) + " samples" +
                           (cfg_ ? " x2 cfg" : "") + ") exceeds the whole pool of " +
                           std::to_string(bm_.num_blocks()) + " blocks");
  }
  // A sample's context reaches prompt_len + max_new_tokens - 1 tokens (its last code is
  // never written back), reported in the int32 decode_context_lens.
  if (prompt_len > INT32_MAX || max_new_tokens - 1 > INT32_MAX - prompt_len) {
    throw std::invalid_argument(who + ": prompt_len + max_new_tokens - 1 = " +
                                std::to_string(sat_add(prompt_len, max_new_tokens - 1)) +
                                " tokens exceeds the int32 context length limit 2147483647");
  }
  Request r;
  r.id = request_id;
  r.prompt_len = prompt_len;
  r.num_samples = num_samples;
  r.max_new_tokens = max_new_tokens;
  r.shared_blocks = prompt_len / bm_.block_size();
  r.per_sample_blocks = bm_.blocks_for_tokens(prompt_len + max_new_tokens) - r.shared_blocks;
  r.need_blocks = need;
  waiting_.push_back(r);
}

BatchPlan Scheduler::schedule() {
  if (num_pending_ != 0) {
    throw StateError("schedule(): " + std::to_string(num_pending_) +
                     " sample(s) of the previous plan were not reported with step_done");
  }
  BatchPlan plan;
  const int64_t h = halves();

  // 1. Decode rows: every live sample that already has a sampled token to write.
  std::vector<int64_t> uncond_rows;
  for (int64_t sid : order_) {
    Sample& s = samples_.at(sid);
    if (s.generated < 1) continue;
    plan.decode_sample_ids.push_back(sid);
    if (cfg_) uncond_rows.push_back(s.uncond_seq);
  }
  plan.decode_seq_ids = plan.decode_sample_ids;
  plan.decode_seq_ids.insert(plan.decode_seq_ids.end(), uncond_rows.begin(), uncond_rows.end());
  for (int64_t seq : plan.decode_seq_ids) {
    AppendResult a = bm_.append_slot(seq);  // cannot run out: admission reserved it
    plan.decode_slot_mapping.push_back(a.slot);
    plan.decode_context_lens.push_back(static_cast<int32_t>(bm_.seq_len(seq)));
    if (a.cow_src >= 0) plan.copies.emplace_back(a.cow_src, a.cow_dst);
    plan.decode_max_blocks =
        std::max<int64_t>(plan.decode_max_blocks, bm_.block_table(seq).size());
  }
  plan.decode_block_tables.resize(plan.decode_seq_ids.size() * plan.decode_max_blocks);
  bm_.block_tables_into(plan.decode_seq_ids, plan.decode_max_blocks,
                        plan.decode_block_tables.data());
  for (int64_t sid : plan.decode_sample_ids) samples_.at(sid).pending = true;
  num_pending_ += static_cast<int64_t>(plan.decode_sample_ids.size());

  // 2. Admission, strictly FIFO: stop at the first request that does not fit.
  while (!waiting_.empty()) {
    Request r = waiting_.front();
    const int64_t rows = r.num_samples * h;
    const int64_t need = r.need_blocks;  // <= num_blocks (add_request), so no overflow below
    if (rows > max_batch_rows_ - running_rows_ || need > bm_.num_blocks() - reserved_) break;
    waiting_.pop_front();
    PrefillItem item;
    item.request_id = r.id;
    item.prompt_len = r.prompt_len;
    for (int64_t half = 0; half < h; ++half) {
      const int64_t parent = next_seq_++;
      bm_.allocate(parent, r.prompt_len);
      std::vector<int64_t>& ids = half == 0 ? item.sample_seq_ids : item.uncond_sample_seq_ids;
      ids.push_back(parent);
      for (int64_t k = 1; k < r.num_samples; ++k) {
        const int64_t child = next_seq_++;
        bm_.fork(parent, child);
        ids.push_back(child);
      }
      (half == 0 ? item.seq_id : item.uncond_seq_id) = parent;
    }
    for (int64_t k = 0; k < r.num_samples; ++k) {
      Sample s;
      s.request_id = r.id;
      s.index = k;
      s.uncond_seq = cfg_ ? item.uncond_sample_seq_ids[k] : -1;
      s.pending = true;
      samples_.emplace(item.sample_seq_ids[k], s);
      order_.push_back(item.sample_seq_ids[k]);
    }
    num_pending_ += r.num_samples;
    r.alive = r.num_samples;
    reserved_ += need;
    running_rows_ += rows;
    running_.emplace(r.id, r);
    plan.prefill.push_back(std::move(item));
  }
  for (int64_t half = 0; half < h; ++half) {
    for (const PrefillItem& item : plan.prefill) {
      const int64_t seq = half == 0 ? item.seq_id : item.uncond_seq_id;
      plan.prefill_seq_ids.push_back(seq);
      plan.prefill_lens.push_back(item.prompt_len);
      const size_t at = plan.prefill_slot_mapping.size();
      plan.prefill_slot_mapping.resize(at + item.prompt_len);
      bm_.slot_mapping_into(seq, 0, item.prompt_len, plan.prefill_slot_mapping.data() + at);
    }
  }
  return plan;
}

void Scheduler::finish_sample(int64_t sample_id, std::vector<int64_t>& completed) {
  Sample s = samples_.at(sample_id);
  bm_.free(sample_id);
  if (cfg_) bm_.free(s.uncond_seq);
  samples_.erase(sample_id);
  Request& r = running_.at(s.request_id);
  reserved_ -= halves() * r.per_sample_blocks;
  running_rows_ -= halves();
  if (--r.alive == 0) {
    reserved_ -= halves() * r.shared_blocks;
    completed.push_back(r.id);
    running_.erase(s.request_id);
  }
}

std::vector<int64_t> Scheduler::step_done(const std::vector<int64_t>& sample_ids,
                                          const std::vector<bool>& finished) {
  if (sample_ids.size() != finished.size()) {
    throw std::invalid_argument("step_done: " + std::to_string(sample_ids.size()) +
                                " sample ids but " + std::to_string(finished.size()) +
                                " finished flags");
  }
  // Validate everything before mutating, so a bad call leaves the scheduler unchanged.
  std::unordered_set<int64_t> seen;
  seen.reserve(sample_ids.size());
  for (size_t i = 0; i < sample_ids.size(); ++i) {
    auto it = samples_.find(sample_ids[i]);
    if (it == samples_.end()) {
      throw UnknownIdError("step_done: unknown sample id " + std::to_string(sample_ids[i]) +
                           " (not a live conditional sample row)");
    }
    if (!it->second.pending) {
      throw StateError("step_done: sample id " + std::to_string(sample_ids[i]) +
                       " was not scheduled in the last plan, or was reported twice");
    }
    if (!seen.insert(sample_ids[i]).second) {
      throw StateError("step_done: sample id " + std::to_string(sample_ids[i]) +
                       " appears twice in one call");
    }
  }
  std::vector<int64_t> completed;
  bool any_finished = false;
  for (size_t i = 0; i < sample_ids.size(); ++i) {
    Sample& s = samples_.at(sample_ids[i]);
    s.pending = false;
    --num_pending_;
    s.generated += 1;
    const int64_t max_new = running_.at(s.request_id).max_new_tokens;
    if (finished[i] || s.generated >= max_new) {
      finish_sample(sample_ids[i], completed);
      any_finished = true;
    }
  }
  if (any_finished) {
    order_.erase(std::remove_if(order_.begin(), order_.end(),
                                [this](int64_t sid) { return samples_.count(sid) == 0; }),
                 order_.end());
  }
  return completed;
}

void Scheduler::abort(int64_t request_id) {
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
    if (it->id == request_id) {
      waiting_.erase(it);
      return;
    }
  }
  if (!running_.count(request_id)) {
    throw UnknownIdError("abort: unknown request id " + std::to_string(request_id) +
                         " (not waiting or running)");
  }
  std::vector<int64_t> victims;
  for (int64_t sid : order_) {
    if (samples_.at(sid).request_id == request_id) victims.push_back(sid);
  }
  std::vector<int64_t> completed;
  for (int64_t sid : victims) {
    if (samples_.at(sid).pending) --num_pending_;
    finish_sample(sid, completed);
  }
  order_.erase(std::remove_if(order_.begin(), order_.end(),
                              [this](int64_t sid) { return samples_.count(sid) == 0; }),
               order_.end());
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats s;
  s.num_blocks = bm_.num_blocks();
  s.num_free_blocks = bm_.num_free_blocks();
  s.reserved_blocks = reserved_;
  s.num_waiting = static_cast<int64_t>(waiting_.size());
  s.num_running_requests = static_cast<int64_t>(running_.size());
  s.num_running_rows = running_rows_;
  s.num_pending_samples = num_pending_;
  return s;
}

SampleInfo Scheduler::sample_info(int64_t sample_id) const {
  auto it = samples_.find(sample_id);
  if (it == samples_.end()) {
    throw UnknownIdError("sample_info: unknown sample id " + std::to_string(sample_id));
  }
  SampleInfo info;
  info.request_id = it->second.request_id;
  info.sample_index = it->second.index;
  info.uncond_seq_id = it->second.uncond_seq;
  info.num_generated = it->second.generated;
  return info;
}

}  // namespace pgen
