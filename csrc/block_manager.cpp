#include "block_manager.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "errors.h"

namespace pgen {

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX) {
    throw std::invalid_argument("BlockManager: num_blocks must be in [1, 2^31-1], got " +
                                std::to_string(num_blocks));
  }
  if (block_size <= 0) {
    throw std::invalid_argument("BlockManager: block_size must be >= 1, got " +
                                std::to_string(block_size));
  }
  if (block_size > INT64_MAX / num_blocks) {
    // Flat slot ids (block * block_size + offset) must fit int64, else they wrap negative.
    throw std::invalid_argument("BlockManager: num_blocks * block_size = " +
                                std::to_string(num_blocks) + " * " + std::to_string(block_size) +
                                " slots overflows int64");
  }
  free_.reserve(static_cast<size_t>(num_blocks));
  // Pushed in reverse so that pop_free hands out 0, 1, 2, ...: deterministic and easy to read
  // in tests and debug dumps.
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
  refcount_.assign(static_cast<size_t>(num_blocks), 0);
}

int64_t BlockManager::blocks_for_tokens(int64_t num_tokens) const {
  if (num_tokens < 0) {
    throw std::invalid_argument("num_tokens must be >= 0, got " + std::to_string(num_tokens));
  }
  // Not (n + bs - 1) / bs: that wraps negative for n near INT64_MAX.
  return num_tokens / block_size_ + (num_tokens % block_size_ != 0 ? 1 : 0);
}

bool BlockManager::can_allocate(int64_t num_tokens) const {
  return blocks_for_tokens(num_tokens) <= num_free_blocks();
}

const BlockManager::Seq& BlockManager::get(int64_t seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) {
    throw UnknownIdError("BlockManager: unknown sequence id " + std::to_string(seq) +
                         " (never allocated, or already freed)");
  }
  return it->second;
}

BlockManager::Seq& BlockManager::get(int64_t seq) {
  return const_cast<Seq&>(static_cast<const BlockManager*>(this)->get(seq));
}

int32_t BlockManager::pop_free() {
  if (free_.empty()) {
    throw OutOfBlocksError("out of KV blocks: need 1, free 0");
  }
  int32_t b = free_.back();
  free_.pop_back();
  refcount_[b] = 1;
  return b;
}

void BlockManager::allocate(int64_t seq, int64_t num_tokens) {
  if (seqs_.count(seq)) {
    throw StateError("BlockManager.allocate: sequence id " + std::to_string(seq) +
                     " already exists");
  }
  const int64_t need = blocks_for_tokens(num_tokens);
  if (need > num_free_blocks()) {
    throw OutOfBlocksError("out of KV blocks: need " + std::to_string(need) + ", free " +
                           std::to_string(num_free_blocks()) + " (allocate seq " +
                           std::to_string(seq) + ", " + std::to_string(num_tokens) + " tokens)");
  }
  Seq s;
  s.num_tokens = num_tokens;
  s.blocks.reserve(static_cast<size_t>(need));
  for (int64_t i = 0; i < need; ++i) s.blocks.push_back(pop_free());
  seqs_.emplace(seq, std::move(s));
}

AppendResult BlockManager::append_slot(int64_t seq) {
  Seq& s = get(seq);
  AppendResult r;
  const int64_t offset = s.num_tokens % block_size_;
  if (offset == 0) {
    // Last block full (or no block yet): the new token starts a fresh, private block.
    if (free_.empty()) {
      throw OutOfBlocksError("out of KV blocks: need 1, free 0 (append to seq " +
                             std::to_string(seq) + ")");
    }
    s.blocks.push_back(pop_free());
  } else {
    int32_t last = s.blocks.back();
    if (refcount_[last] > 1) {
      if (free_.empty()) {
        throw OutOfBlocksError("out of KV blocks: need 1, free 0 (copy-on-write for seq " +
                               std::to_string(seq) + ")");
      }
      int32_t fresh = pop_free();
      refcount_[last] -= 1;
      s.blocks.back() = fresh;
      r.cow_src = last;
      r.cow_dst = fresh;
    }
  }
  r.slot = static_cast<int64_t>(s.blocks.back()) * block_size_ + offset;
  s.num_tokens += 1;
  return r;
}

void BlockManager::fork(int64_t parent, int64_t child) {
  const Seq& p = get(parent);
  if (seqs_.count(child)) {
    throw StateError("BlockManager.fork: child sequence id " + std::to_string(child) +
                     " already exists");
  }
  Seq c = p;  // copy before emplace: emplace may rehash and invalidate `p`
  for (int32_t b : c.blocks) refcount_[b] += 1;
  seqs_.emplace(child, std::move(c));
}

void BlockManager::free(int64_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) {
    throw UnknownIdError("BlockManager.free: unknown sequence id " + std::to_string(seq) +
                         " (never allocated, or already freed: double free?)");
  }
  for (int32_t b : it->second.blocks) {
    if (--refcount_[b] == 0) free_.push_back(b);
  }
  seqs_.erase(it);
}

int64_t BlockManager::seq_len(int64_t seq) const { return get(seq).num_tokens; }

const std::vector<int32_t>& BlockManager::block_table(int64_t seq) const {
  return get(seq).blocks;
}

int32_t BlockManager::refcount(int64_t block) const {
  if (block < 0 || block >= num_blocks_) {
    throw std::out_of_range("block id " + std::to_string(block) + " outside [0, " +
                            std::to_string(num_blocks_) + ")");
  }
  return refcount_[block];
}

std::vector<int64_t> BlockManager::seq_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(seqs_.size());
  for (const auto& kv : seqs_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

void BlockManager::check_slot_range(int64_t seq, int64_t start, int64_t end) const {
  const Seq& s = get(seq);
  if (start < 0 || end < start || end > s.num_tokens) {
    throw std::invalid_argument("slot_mapping: range [" + std::to_string(start) + ", " +
                                std::to_string(end) + ") is outside sequence " +
                                std::to_string(seq) + " of length " +
                                std::to_string(s.num_tokens) +
                                " (need 0 <= start <= end <= length)");
  }
}

void BlockManager::slot_mapping_into(int64_t seq, int64_t start, int64_t end,
                                     int64_t* out) const {
  check_slot_range(seq, start, end);
  const Seq& s = get(seq);
  for (int64_t pos = start; pos < end; ++pos) {
    out[pos - start] =
        static_cast<int64_t>(s.blocks[pos / block_size_]) * block_size_ + pos % block_size_;
  }
}

void BlockManager::check_block_tables(const std::vector<int64_t>& seqs,
                                      int64_t max_blocks) const {
  if (max_blocks < 0) {
    throw std::invalid_argument("block_tables: max_blocks must be >= 0, got " +
                                std::to_string(max_blocks));
  }
  for (int64_t id : seqs) {
    const int64_t n = static_cast<int64_t>(get(id).blocks.size());
    if (n > max_blocks) {
      throw std::invalid_argument("block_tables: sequence " + std::to_string(id) + " has " +
                                  std::to_string(n) + " blocks > max_blocks " +
                                  std::to_string(max_blocks));
    }
  }
  const int64_t rows = static_cast<int64_t>(seqs.size());
  if (rows > 0 && max_blocks > INT64_MAX / static_cast<int64_t>(sizeof(int32_t)) / rows) {
    throw std::invalid_argument("block_tables: " + std::to_string(rows) + " x max_blocks " +
                                std::to_string(max_blocks) + " int32 table overflows int64 bytes");
  }
}

void BlockManager::block_tables_into(const std::vector<int64_t>& seqs, int64_t max_blocks,
                                     int32_t* out) const {
  check_block_tables(seqs, max_blocks);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Seq& s = get(seqs[i]);
    const int64_t n = static_cast<int64_t>(s.blocks.size());
    int32_t* row = out + i * max_blocks;
    std::copy(s.blocks.begin(), s.blocks.end(), row);
    std::fill(row + n, row + max_blocks, 0);
  }
}

}  // namespace pgen
