import torch
from safetensors.torch import load_file

from icd.models import tiny
from icd.train.teacher import TeacherConfig, train_teacher


def _cfg(tmp_path, vae_dir, out, steps):
    return TeacherConfig(out_dir=str(tmp_path / out), vae_path=str(vae_dir), steps=steps, batch_size=2, n_images=12,
                         checkpoint_every=2, log_every=1, warmup_steps=2, threads=0)


def test_teacher_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    vae_dir = tmp_path / "vae"
    tiny.build_vae().save_pretrained(vae_dir)
    train_teacher(_cfg(tmp_path, vae_dir, "straight", 4))
    train_teacher(_cfg(tmp_path, vae_dir, "resumed", 2))
    train_teacher(_cfg(tmp_path, vae_dir, "resumed", 4))  # picks up the step-2 checkpoint
    a = load_file(str(tmp_path / "straight" / "step-000004" / "model.unet.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "step-000004" / "model.unet.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ema_a = load_file(str(tmp_path / "straight" / "step-000004" / "model.ema_unet.safetensors"))
    ema_b = load_file(str(tmp_path / "resumed" / "step-000004" / "model.ema_unet.safetensors"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert (tmp_path / "straight" / "final" / "model_index.json").is_file()
