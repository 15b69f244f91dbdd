//! Feature `torch`: a tch [`nn::VarStore`] in an elastic [`State`].

use super::State;
use crate::error::{Error, Result};
use tch::{nn, Device, Tensor};

fn terr(what: &'static str, name: &str) -> impl Fn(tch::TchError) -> Error {
    let name = name.to_string();
    move |e| Error::InvalidArgument(format!("{what}: variable {name:?}: {e}"))
}

impl State {
    /// Copy every variable of `vs` into buffer `<prefix>/<variable name>`
    /// (host bytes of its kind), so that [`State::commit`] keeps the model
    /// and new members receive it. Optimizer state that tch does not expose
    /// (momentum buffers) is not included: keep its step and the epoch in
    /// counters and rebuild the optimizer after a change.
    ///
    /// ```no_run
    /// use kolo::torch::tch::{nn, Device};
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let _fc = nn::linear(vs.root() / "fc", 4, 2, Default::default());
    /// let mut state = kolo::elastic::State::new();
    /// state.put_var_store("model", &vs)?;
    /// state.set_counter("epoch", 0);
    /// # Ok::<(), kolo::Error>(())
    /// ```
    pub fn put_var_store(&mut self, prefix: &str, vs: &nn::VarStore) -> Result<()> {
        for (name, t) in vs.variables() {
            let e = terr("put_var_store", &name);
            let host = t
                .f_to_device(Device::Cpu)
                .and_then(|h| h.f_contiguous())
                .map_err(&e)?;
            let kind = host.f_kind().map_err(&e)?;
            let n = host.numel();
            let buf = self.bytes_mut(&format!("{prefix}/{name}"));
            buf.resize(n * kind.elt_size_in_bytes(), 0);
            host.f_copy_data_u8(buf, n).map_err(&e)?;
        }
        Ok(())
    }

    /// Copy buffers `<prefix>/<variable name>` back into the variables of
    /// `vs`, in place (modules built from `vs` see the values). Fails naming
    /// the variable when a buffer is missing or has the wrong size.
    pub fn load_var_store(&self, prefix: &str, vs: &mut nn::VarStore) -> Result<()> {
        for (name, mut t) in vs.variables() {
            let e = terr("load_var_store", &name);
            let key = format!("{prefix}/{name}");
            let b = self.bytes(&key).ok_or_else(|| {
                Error::InvalidArgument(format!("load_var_store: no buffer {key:?} in the state"))
            })?;
            let kind = t.f_kind().map_err(&e)?;
            if b.len() != t.numel() * kind.elt_size_in_bytes() {
                return Err(Error::InvalidArgument(format!(
                    "load_var_store: buffer {key:?} has {} bytes, variable {name:?} needs {}",
                    b.len(),
                    t.numel() * kind.elt_size_in_bytes()
                )));
            }
            let src = Tensor::f_from_data_size(b, &t.size(), kind).map_err(&e)?;
            tch::no_grad(|| t.f_copy_(&src)).map_err(&e)?;
        }
        Ok(())
    }
}
