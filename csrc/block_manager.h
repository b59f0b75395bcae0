// Paged KV-cache block manager (host side, no torch dependency).
//
// The KV cache of every layer is one tensor [num_blocks, block_size, Hkv, D]; a token at
// logical position `pos` of a sequence lives at flat slot
//     slot = block_table[pos / block_size] * block_size + pos % block_size.
// Blocks are reference counted so that forked sequences (the samples of one prompt)
// share the prompt's blocks; the first write into a shared block copies it (copy-on-write)
// and the copy instruction is returned to the caller, who owns the KV tensors.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace pgen {

// Result of BlockManager::append_slot: the slot the new token's K/V goes to and, when the
// last block had to be copied (it was shared), the copy the caller must run *before*
// writing the new token: cache[cow_dst] = cache[cow_src] (whole block, every layer).
struct AppendResult {
  int64_t slot = -1;
  int32_t cow_src = -1;  // -1: no copy needed
  int32_t cow_dst = -1;
};

class BlockManager {
 public:
  // num_blocks in [1, 2^31-1], block_size >= 1 and num_blocks * block_size <= INT64_MAX (every
  // flat slot id fits int64). Throws std::invalid_argument otherwise.
  BlockManager(int64_t num_blocks, int64_t block_size);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_seqs() const { return static_cast<int64_t>(seqs_.size()); }

  // Number of blocks needed to hold `num_tokens` (>= 0) tokens (ceil division, exact for
  // every int64 count).
  int64_t blocks_for_tokens(int64_t num_tokens) const;
  // True when a fresh sequence of `num_tokens` tokens fits in the free pool now.
  bool can_allocate(int64_t num_tokens) const;

  // Create sequence `seq` holding `num_tokens` (>= 0) tokens. Throws StateError when `seq`
  // exists, OutOfBlocksError when the pool is short (nothing is allocated then).
  void allocate(int64_t seq, int64_t num_tokens);
  // Reserve the slot of one more token of `seq` (see AppendResult).
  AppendResult append_slot(int64_t seq);
  // Child shares every block of parent (refcount + 1 each) and its length.
  void fork(int64_t parent, int64_t child);
  // Release `seq`; blocks whose refcount drops to 0 return to the pool.
  void free(int64_t seq);

  bool has_seq(int64_t seq) const { return seqs_.count(seq) != 0; }
  int64_t seq_len(int64_t seq) const;
  const std::vector<int32_t>& block_table(int64_t seq) const;
  int32_t refcount(int64_t block) const;
  std::vector<int64_t> seq_ids() const;

  // Throws UnknownIdError for an unknown `seq`, std::invalid_argument unless
  // 0 <= start <= end <= seq_len(seq). Callers check before sizing an output buffer.
  void check_slot_range(int64_t seq, int64_t start, int64_t end) const;
  // Slots of token positions [start, end) of `seq`, appended to `out` (range checked).
  void slot_mapping_into(int64_t seq, int64_t start, int64_t end, int64_t* out) const;
  // Throws UnknownIdError for an unknown id, std::invalid_argument when max_blocks < 0, a
  // table is longer than max_blocks, or seqs.size() * max_blocks int32s overflow a byte count.
  void check_block_tables(const std::vector<int64_t>& seqs, int64_t max_blocks) const;
  // Block tables of `seqs` into a row-major int32 [seqs.size(), max_blocks] buffer, padded
  // with 0. Checks everything (check_block_tables) before writing anything.
  void block_tables_into(const std::vector<int64_t>& seqs, int64_t max_blocks, int32_t* out) const;

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    int64_t num_tokens = 0;
  };
  const Seq& get(int64_t seq) const;
  Seq& get(int64_t seq);
  int32_t pop_free();

  int64_t num_blocks_;
  int64_t block_size_;
  std::vector<int32_t> free_;      // stack of free block ids
  std::vector<int32_t> refcount_;  // per block
  std::unordered_map<int64_t, Seq> seqs_;
};

}  // namespace pgen
