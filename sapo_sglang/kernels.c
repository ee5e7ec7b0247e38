/* The delta sync's scans (sapo_sglang.kernels), trainer side and server side. The numpy paths in
 * sapo_megatron/rollout/sglang/weight_sync/delta_pieces.py and sapo_sglang/delta_loader.py give
 * the same output, run where no C compiler is, and are the tests' reference.
 *
 * Why C: numpy needs three passes and a temporary per chunk for "which bit patterns changed"
 * (compare into a bool mask, flatnonzero, copy the new values into the copy), and four more over
 * the changed positions for the uint8 gap encoding; each pass runs at 1-2 ns per element on a
 * CPU host. One pass here does each job at memory speed. */
#include <stdint.h>
#include <string.h>

/* Positions (base + i) of the elements whose bit patterns differ between fresh and held, in
 * order, into out (room for n); held takes fresh's bits wherever they differ. Returns how many.
 * Four elements are compared at once and skipped when equal (the common case at RL densities),
 * so unchanged memory in held is read but never written. */
#define DIFF(NAME, T, LANES, WIDE)                                                              \
    int64_t NAME(const T *restrict fresh, T *restrict held, int64_t n, int64_t base,            \
                 int64_t *restrict out) {                                                       \
        int64_t k = 0, i = 0;                                                                   \
        for (; i + LANES <= n; i += LANES) {                                                    \
            WIDE a, b;                                                                          \
            memcpy(&a, fresh + i, sizeof a);                                                    \
            memcpy(&b, held + i, sizeof b);                                                     \
            if (a == b) continue;                                                               \
            for (int j = 0; j < LANES; j++) {                                                   \
                out[k] = base + i + j;                                                          \
                k += fresh[i + j] != held[i + j];                                               \
            }                                                                                   \
            memcpy(held + i, &a, sizeof a);                                                     \
        }                                                                                       \
        for (; i < n; i++) {                                                                    \
            out[k] = base + i;                                                                  \
            k += fresh[i] != held[i];                                                           \
            held[i] = fresh[i];                                                                 \
        }                                                                                       \
        return k;                                                                               \
    }

DIFF(sapo_diff_u16, uint16_t, 4, uint64_t)
DIFF(sapo_diff_u32, uint32_t, 2, uint64_t)

/* Entries of the uint8 gap encoding of k sorted, distinct positions: one per position plus one
 * bridging entry every max_gap elements of a longer gap (the codec's gap_positions). */
int64_t sapo_gap_count(const int64_t *restrict pos, int64_t k, int64_t max_gap) {
    int64_t entries = k, prev = -1;
    for (int64_t i = 0; i < k; i++) {
        int64_t gap = pos[i] - prev;
        if (gap > max_gap) entries += (gap - 1) / max_gap;
        prev = pos[i];
    }
    return entries;
}

/* The gap encoding itself: gaps[e] (1..max_gap) from the previous entry (the first from -1) and
 * vals[e] = bits[entry's position]; a bridging entry carries the element's own bits. gaps and
 * vals have room for sapo_gap_count(...) entries. */
#define GAP_ENCODE(NAME, T)                                                                     \
    void NAME(const int64_t *restrict pos, int64_t k, const T *restrict bits, int64_t max_gap,  \
              uint8_t *restrict gaps, T *restrict vals) {                                       \
        int64_t e = 0, prev = -1;                                                               \
        for (int64_t i = 0; i < k; i++) {                                                       \
            int64_t p = pos[i];                                                                 \
            while (p - prev > max_gap) {                                                        \
                prev += max_gap;                                                                \
                gaps[e] = (uint8_t)max_gap;                                                     \
                vals[e++] = bits[prev];                                                         \
            }                                                                                   \
            gaps[e] = (uint8_t)(p - prev);                                                      \
            vals[e++] = bits[p];                                                                \
            prev = p;                                                                           \
        }                                                                                       \
    }

GAP_ENCODE(sapo_gap_encode_u16, uint16_t)
GAP_ENCODE(sapo_gap_encode_u32, uint32_t)

/* The server's side: flat[walked position] = vals[i] for every entry, in one ascending pass
 * (numpy needs a cumsum into an int64 temporary and a scatter). The caller checked that the
 * gaps' sum is at most n. */
#define GAP_APPLY(NAME, T)                                                                      \
    void NAME(const uint8_t *restrict gaps, const T *restrict vals, int64_t e, T *restrict flat) { \
        int64_t p = -1;                                                                         \
        for (int64_t i = 0; i < e; i++) {                                                       \
            p += gaps[i];                                                                       \
            flat[p] = vals[i];                                                                  \
        }                                                                                       \
    }

GAP_APPLY(sapo_gap_apply_u16, uint16_t)
GAP_APPLY(sapo_gap_apply_u32, uint32_t)

/* The same into a run of columns of a row-major matrix (a row-parallel weight's region): entry
 * positions count row-major over the region's rows x cols; row r starts row_stride elements after
 * row r - 1. Spares the server a copy of the region out and back (a third of a MoE's weights are
 * row-parallel: o_proj, every expert's down_proj). The caller checked the last position. */
#define GAP_APPLY_2D(NAME, T)                                                                   \
    void NAME(const uint8_t *restrict gaps, const T *restrict vals, int64_t e, T *restrict base, \
              int64_t cols, int64_t row_stride) {                                               \
        int64_t col = -1;                                                                       \
        T *row = base;                                                                          \
        for (int64_t i = 0; i < e; i++) {                                                       \
            col += gaps[i];                                                                     \
            while (col >= cols) {                                                               \
                col -= cols;                                                                    \
                row += row_stride;                                                              \
            }                                                                                   \
            row[col] = vals[i];                                                                 \
        }                                                                                       \
    }

GAP_APPLY_2D(sapo_gap_apply_2d_u16, uint16_t)
GAP_APPLY_2D(sapo_gap_apply_2d_u32, uint32_t)
