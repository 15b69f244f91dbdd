//! Unit tests of the asynchronous exports on a one-rank communicator: each
//! runs through the engine, results land in the caller's buffers at the
//! wait, and bad arguments are refused before anything is submitted. The
//! multi-rank behaviour is tested from C (ffi/tests/c/test_kolo.c).

use super::*;
use std::ptr::{null, null_mut};

fn one_rank() -> *mut kolo_comm {
    let c = Communicator::init(kolo::Config::local(0, 1, 0)).expect("1-rank communicator");
    Box::into_raw(Box::new(kolo_comm::new(c)))
}

fn last_error() -> String {
    // SAFETY: kolo_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(kolo_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn ok(rc: c_int) {
    assert_eq!(rc, KOLO_OK, "{}", last_error());
}

fn invalid_with(rc: c_int, needle: &str) {
    let msg = last_error();
    assert_eq!(rc, KOLO_ERR_INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
}

const F32: kolo_dtype = kolo_dtype(6);
const F64: kolo_dtype = kolo_dtype(7);
const I64: kolo_dtype = kolo_dtype(3);
const SUM: kolo_op = kolo_op(1);

#[test]
fn local_size_and_join_on_one_rank() {
    unsafe {
        let c = one_rank();
        let mut v = -1;
        ok(kolo_comm_local_size(c, &mut v));
        assert_eq!(v, 1);
        invalid_with(kolo_comm_local_size(c, null_mut()), "local_size is NULL");
        invalid_with(kolo_join(c, null_mut()), "last_rank is NULL");
        let mut last = -1;
        ok(kolo_join(c, &mut last));
        assert_eq!(last, 0);
        ok(kolo_comm_destroy(c));
    }
}

#[test]
fn compressed_allreduce_checks_its_compression() {
    unsafe {
        let c = one_rank();
        let mut v = [1.25f32, -3.0, 0.5];
        let mut h = null_mut();
        let p = v.as_mut_ptr().cast();
        let rc = kolo_allreduce_async_compressed(
            c,
            c"g".as_ptr(),
            p,
            3,
            F32,
            SUM,
            c"zip".as_ptr(),
            &mut h,
        );
        invalid_with(rc, "unknown compression \"zip\"");
        assert!(h.is_null());
        for comp in [c"fp16", c"bf16", c"none", c"topk:1"] {
            ok(kolo_allreduce_async_compressed(
                c,
                c"g".as_ptr(),
                p,
                3,
                F32,
                SUM,
                comp.as_ptr(),
                &mut h,
            ));
            ok(kolo_wait(h));
            assert_eq!(v, [1.25, -3.0, 0.5], "{comp:?}");
        }
        // Compression applies to float32 only: the engine refuses float64.
        let mut d = [1.0f64; 2];
        let rc = kolo_allreduce_async_compressed(
            c,
            c"d".as_ptr(),
            d.as_mut_ptr().cast(),
            2,
            F64,
            SUM,
            c"fp16".as_ptr(),
            &mut h,
        );
        invalid_with(rc, "float32");
        ok(kolo_comm_destroy(c));
    }
}

#[test]
fn async_collectives_write_the_output_at_the_wait() {
    unsafe {
        let c = one_rank();
        let send = [7i64, 8, 9];
        let mut recv = [0i64; 3];
        let mut h = null_mut();
        let (s, r) = (send.as_ptr().cast(), recv.as_mut_ptr().cast());
        ok(kolo_allgather_async(
            c,
            c"ag".as_ptr(),
            s,
            3,
            r,
            3,
            I64,
            &mut h,
        ));
        ok(kolo_wait(h));
        assert_eq!(recv, send);
        // A wrong total fails at the wait, naming the tensor, and writes nothing.
        recv = [0; 3];
        ok(kolo_allgather_async(
            c,
            c"ag".as_ptr(),
            s,
            2,
            r,
            3,
            I64,
            &mut h,
        ));
        invalid_with(kolo_wait(h), "\"ag\": the result has 2 elements");
        assert_eq!(recv, [0; 3]);
        ok(kolo_broadcast_async(
            c,
            c"bc".as_ptr(),
            r,
            3,
            I64,
            0,
            &mut h,
        ));
        ok(kolo_wait(h));
        invalid_with(
            kolo_broadcast_async(c, c"bc".as_ptr(), r, 3, I64, -1, &mut h),
            "root -1",
        );
        ok(kolo_reduce_scatter_async(
            c,
            c"rs".as_ptr(),
            s,
            r,
            3,
            I64,
            SUM,
            &mut h,
        ));
        ok(kolo_wait(h));
        assert_eq!(recv, send);
        recv = [0; 3];
        ok(kolo_alltoall_async(c, c"aa".as_ptr(), s, r, 3, I64, &mut h));
        let mut done = 0;
        while done == 0 {
            ok(kolo_test(h, &mut done));
        }
        ok(kolo_wait(h));
        assert_eq!(recv, send);
        invalid_with(
            kolo_alltoall_async(c, c"kolo.x".as_ptr(), s, r, 3, I64, &mut h),
            "reserved",
        );
        invalid_with(
            kolo_alltoall_async(c, null(), s, r, 3, I64, &mut h),
            "name is NULL",
        );
        assert!(h.is_null());
        ok(kolo_comm_destroy(c));
    }
}

#[test]
fn grouped_allreduce_submits_all_or_nothing() {
    unsafe {
        let c = one_rank();
        let mut a = [1.5f32, 2.5];
        let mut b = [3i64];
        let names = [c"a".as_ptr(), c"b".as_ptr()];
        let mut bufs = [a.as_mut_ptr().cast::<c_void>(), b.as_mut_ptr().cast()];
        let counts = [2usize, 1];
        let mut hs = [null_mut(); 2];
        // A bad member (unknown dtype) refuses the whole group.
        let bad = [F32, kolo_dtype(42)];
        let rc = kolo_grouped_allreduce_async(
            c,
            c"g".as_ptr(),
            2,
            names.as_ptr(),
            bufs.as_ptr(),
            counts.as_ptr(),
            bad.as_ptr(),
            SUM,
            hs.as_mut_ptr(),
        );
        invalid_with(rc, "unknown kolo_dtype 42");
        assert!(hs.iter().all(|h| h.is_null()));
        bufs[1] = null_mut();
        let dtypes = [F32, I64];
        let rc = kolo_grouped_allreduce_async(
            c,
            c"g".as_ptr(),
            2,
            names.as_ptr(),
            bufs.as_ptr(),
            counts.as_ptr(),
            dtypes.as_ptr(),
            SUM,
            hs.as_mut_ptr(),
        );
        invalid_with(rc, "bufs[i] is NULL");
        // Nothing was reserved: the same names go through now.
        bufs[1] = b.as_mut_ptr().cast();
        ok(kolo_grouped_allreduce_async(
            c,
            c"g".as_ptr(),
            2,
            names.as_ptr(),
            bufs.as_ptr(),
            counts.as_ptr(),
            dtypes.as_ptr(),
            SUM,
            hs.as_mut_ptr(),
        ));
        for h in hs {
            ok(kolo_wait(h));
        }
        assert_eq!((a, b), ([1.5, 2.5], [3]));
        ok(kolo_comm_destroy(c));
    }
}
