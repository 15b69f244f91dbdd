// Post-accumulate-grad hooks for kolo::torch (hooks.rs): autograd calls the hook of a leaf
// tensor once per backward pass, after every contribution to its .grad has been summed, and
// the hook tells Rust which parameter is ready. tch 0.24 exposes no autograd hooks, hence
// this shim. Nothing here lets a C++ exception reach Rust: every entry point catches all
// and returns an error code with a message.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstddef>
#include <cstring>
#include <exception>
#include <memory>

extern "C" {
// Called by the hook: `status` 0 when the gradient is ready in place (defined, contiguous,
// memory of its own), 1 when preparing it failed (Rust then reduces it after backward).
typedef void (*kolo_grad_ready_fn)(void *ctx, size_t index, int status);
}

namespace {

void put_error(char *buf, size_t len, const char *msg) {
  if (buf == nullptr || len == 0) {
    return;
  }
  std::strncpy(buf, msg, len - 1);
  buf[len - 1] = '\0';
}

struct ReadyHook final : torch::autograd::PostAccumulateGradHook {
  ReadyHook(kolo_grad_ready_fn fn, void *ctx, size_t index)
      : fn_(fn), ctx_(ctx), index_(index) {}

  void operator()(const torch::autograd::Variable &param) override {
    int status = 0;
    try {
      // The engine reduces the gradient in place while backward goes on, so it must own
      // its memory: a gradient autograd stole from a buffer that another branch of the
      // graph still reads (a view of it) is cloned first, and so is a non-contiguous one.
      at::Tensor &grad = param.mutable_grad();
      if (grad.defined() && !grad.is_sparse() &&
          (!grad.is_contiguous() || grad.storage().use_count() > 1)) {
        grad = grad.clone(at::MemoryFormat::Contiguous);
      }
    } catch (...) {
      status = 1;
    }
    fn_(ctx_, index_, status);
  }

  kolo_grad_ready_fn fn_;
  void *ctx_;
  size_t index_;
};

} // namespace

extern "C" {

// Install the hook on `tensor` (a torch::Tensor*, i.e. at::Tensor*, as tch's C_tensor is).
// Fails when the tensor is not a leaf that requires grad, or already has such a hook.
int kolo_hook_install(void *tensor, kolo_grad_ready_fn fn, void *ctx, size_t index,
                      char *err, size_t err_len) noexcept {
  try {
    auto *t = static_cast<at::Tensor *>(tensor);
    if (t == nullptr || !t->defined()) {
      put_error(err, err_len, "the tensor is undefined");
      return 1;
    }
    if (!t->requires_grad() || !t->is_leaf()) {
      put_error(err, err_len, "the tensor is not a leaf that requires grad");
      return 1;
    }
    if (torch::autograd::impl::post_acc_grad_hooks(*t)) {
      put_error(err, err_len, "the tensor already has a post-accumulate-grad hook");
      return 1;
    }
    torch::autograd::impl::set_post_acc_grad_hooks(
        *t, std::make_unique<ReadyHook>(fn, ctx, index));
    return 0;
  } catch (const std::exception &e) {
    put_error(err, err_len, e.what());
  } catch (...) {
    put_error(err, err_len, "unknown C++ exception");
  }
  return 1;
}

// Remove the hook installed by kolo_hook_install with this context (another hook is left).
int kolo_hook_remove(void *tensor, void *ctx, char *err, size_t err_len) noexcept {
  try {
    auto *t = static_cast<at::Tensor *>(tensor);
    // post_acc_grad_hooks asserts that autograd metadata exists (it does once a hook
    // was installed, even if the tensor was frozen since).
    if (t == nullptr || !t->defined() ||
        torch::autograd::impl::get_autograd_meta(*t) == nullptr) {
      return 0;
    }
    auto &hook = torch::autograd::impl::post_acc_grad_hooks(*t);
    auto *mine = dynamic_cast<ReadyHook *>(hook.get());
    if (mine != nullptr && mine->ctx_ == ctx) {
      torch::autograd::impl::set_post_acc_grad_hooks(*t, nullptr);
    }
    return 0;
  } catch (const std::exception &e) {
    put_error(err, err_len, e.what());
  } catch (...) {
    put_error(err, err_len, "unknown C++ exception");
  }
  return 1;
}

// Give `tensor` a zero gradient without running autograd (so no hook fires), for a
// parameter this rank did not use in the step.
int kolo_grad_zeros(void *tensor, char *err, size_t err_len) noexcept {
  try {
    auto *t = static_cast<at::Tensor *>(tensor);
    t->mutable_grad() = at::zeros_like(*t, at::MemoryFormat::Contiguous);
    return 0;
  } catch (const std::exception &e) {
    put_error(err, err_len, e.what());
  } catch (...) {
    put_error(err, err_len, "unknown C++ exception");
  }
  return 1;
}

} // extern "C"
