//! The binary's global allocator: mimalloc, asked for an alignment only when its plain `malloc`
//! would not give it anyway.
//!
//! The `mimalloc` crate's allocator passes every allocation to `mi_malloc_aligned`. mimalloc v3
//! serves that quickly only for blocks up to 1 KiB whose size class has a free block at hand;
//! anything else (hyper's 8 KiB buffers, a page of small blocks running out) takes its generic
//! aligned path, which over-allocates every size whose class is not a power of two. That path was
//! 4.5 calls and 1,100 instructions per keep-alive request, 3% of the proxy's user-space work
//! (callgrind, `BENCHMARKS.md`, session 6). mimalloc's `malloc` is a C `malloc`: its blocks are
//! aligned for any fundamental type, so std's own rule for the system allocator applies (an
//! alignment of at most 16 and at most the size goes to plain `malloc`). The rest, such as tokio's
//! 128-byte-aligned tasks, keeps the aligned calls.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::c_void;
use std::time::{Duration, Instant};

use libmimalloc_sys::{
    mi_collect, mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// The alignment of every mimalloc block of at least this size: its `MI_MAX_ALIGN_SIZE`, which is
/// `alignof(max_align_t)` on the targets we build for. Its size classes above 8 bytes are multiples
/// of 16, and a page's first block starts 16-aligned (mimalloc v3, as `libmimalloc-sys` 0.1.49
/// vendors it; smaller blocks are 8-aligned, which the `align <= size` half of the rule covers).
const MALLOC_ALIGN: usize = 16;

/// How often a runtime worker that runs out of work has mimalloc collect what its thread freed.
const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// Called on a runtime worker each time it runs out of work: at most once per [`COLLECT_EVERY`],
/// mimalloc frees the thread's empty pages and returns to the system the memory freed long
/// enough ago (its `purge_delay`, 1 s).
///
/// mimalloc does that work only in its own calls, when the thread allocates or frees pages. After
/// a burst, an idle proxy makes none, and kept what the burst freed: 10,000 keep-alive connections
/// going idle free their tasks, and the process stayed 0.6 KiB per connection larger than what it
/// still used (`BENCHMARKS.md`, session 8). The runtime's timer wakes the worker that waits on the
/// reactor every second (`server::timer_floor`), so with one worker an idle proxy collects within
/// two seconds; with several, a worker that waits on its own collects the next time it runs out of
/// work after a second. A busy worker pays a clock read per park.
pub fn worker_idle() {
    thread_local! {
        static LAST_COLLECT: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    LAST_COLLECT.with(|last| {
        if last
            .get()
            .is_some_and(|at| now.duration_since(at) < COLLECT_EVERY)
        {
            return;
        }
        last.set(Some(now));
        // SAFETY: takes no pointer; collects the calling thread's own heap.
        unsafe { mi_collect(false) };
    });
}

/// mimalloc behind Rust's allocator interface; see the module's documentation.
pub struct MiMalloc;

/// Whether plain `malloc(size)` returns memory aligned as `align` asks.
fn malloc_aligns(align: usize, size: usize) -> bool {
    align <= MALLOC_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc, sized and aligned as the layout asks (plain `malloc`
// only where its guarantee covers the alignment), and goes back to mimalloc's `mi_free`, which
// takes blocks from any of these calls.
unsafe impl GlobalAlloc for MiMalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: a size and a power-of-two alignment, as mimalloc's functions take them.
        unsafe {
            if malloc_aligns(layout.align(), layout.size()) {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe {
            if malloc_aligns(layout.align(), layout.size()) {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi_free(ptr.cast::<c_void>()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator; the new block keeps `layout`'s alignment.
        unsafe {
            if malloc_aligns(layout.align(), new_size) {
                mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks from the plain path and the aligned one are aligned as asked (many per size
    /// class, not only a page's first), keep their bytes when grown or shrunk, and are zeroed when
    /// asked.
    #[test]
    fn blocks_are_aligned_as_their_layout_asks() {
        let sizes = [
            1, 7, 8, 12, 16, 24, 48, 100, 112, 768, 1000, 1025, 3000, 8192, 70_000,
        ];
        for align in [1, 2, 4, 8, 16, 32, 128, 4096] {
            for size in sizes {
                let layout = Layout::from_size_align(size, align).expect("valid layout");
                let blocks: Vec<*mut u8> =
                    (0..64).map(|_| unsafe { MiMalloc.alloc(layout) }).collect();
                for &p in &blocks {
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc size {size} align {align}");
                    unsafe { p.write_bytes(0xa5, size) };
                }
                for (i, &p) in blocks.iter().enumerate() {
                    // Grown for half of them, shrunk (to at most the alignment) for the rest.
                    let new_size = if i % 2 == 0 {
                        size * 3
                    } else {
                        size.div_ceil(2)
                    };
                    let kept = size.min(new_size);
                    unsafe {
                        let moved = MiMalloc.realloc(p, layout, new_size);
                        assert!(!moved.is_null());
                        assert_eq!(
                            moved as usize % align,
                            0,
                            "realloc {size} → {new_size}, align {align}"
                        );
                        assert!((0..kept).all(|i| *moved.add(i) == 0xa5));
                        MiMalloc.dealloc(moved, Layout::from_size_align(new_size, align).unwrap());
                    }
                }
                unsafe {
                    let z = MiMalloc.alloc_zeroed(layout);
                    assert!(!z.is_null());
                    assert_eq!(
                        z as usize % align,
                        0,
                        "alloc_zeroed size {size} align {align}"
                    );
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    MiMalloc.dealloc(z, layout);
                }
            }
        }
    }
}
