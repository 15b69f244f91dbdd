//! The 8×8 handwritten digits set (1797 images, 10 classes), shipped in the
//! repository so training examples and tests need no download.
//!
//! Source: the UCI "Optical Recognition of Handwritten Digits" test set
//! (E. Alpaydin, C. Kaynak, 1998; CC BY 4.0), as redistributed by scikit-learn
//! (`sklearn/datasets/data/digits.csv.gz`). `digits.bin` holds 1797 records of
//! 65 bytes: 64 pixel values in 0..=16 (row-major 8×8), then the label 0..=9.
//!
//! Include it with `#[path = ".../examples/data/digits.rs"] mod digits;`.
#![allow(dead_code)]

const RAW: &[u8] = include_bytes!("digits.bin");

/// Pixels per image.
pub const FEATURES: usize = 64;
/// Number of classes.
pub const CLASSES: usize = 10;

/// A set of images (pixels scaled to 0..=1) with their labels.
pub struct Split {
    /// `len * FEATURES` values, row-major.
    pub images: Vec<f32>,
    /// One label per image.
    pub labels: Vec<u8>,
}

impl Split {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Pixels of image `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        &self.images[i * FEATURES..(i + 1) * FEATURES]
    }
}

/// Every image, in file order.
pub fn all() -> Split {
    assert_eq!(RAW.len() % (FEATURES + 1), 0, "digits.bin is corrupt");
    let mut images = Vec::with_capacity(RAW.len() / (FEATURES + 1) * FEATURES);
    let mut labels = Vec::with_capacity(RAW.len() / (FEATURES + 1));
    for rec in RAW.chunks_exact(FEATURES + 1) {
        images.extend(rec[..FEATURES].iter().map(|&p| f32::from(p) / 16.0));
        labels.push(rec[FEATURES]);
    }
    Split { images, labels }
}

/// A fixed split: every 5th image (index % 5 == 4) is held out for testing,
/// giving 1438 training and 359 test images.
pub fn train_test() -> (Split, Split) {
    let all = all();
    let mut train = Split {
        images: Vec::new(),
        labels: Vec::new(),
    };
    let mut test = Split {
        images: Vec::new(),
        labels: Vec::new(),
    };
    for i in 0..all.len() {
        let dst = if i % 5 == 4 { &mut test } else { &mut train };
        dst.images.extend_from_slice(all.image(i));
        dst.labels.push(all.labels[i]);
    }
    (train, test)
}
