"""The environment report that `echoshot check-env` and `echoshot upscale` print first."""

from dataclasses import dataclass, field
from pathlib import Path

from echoshot_ai_server.engine.device import torch_runtime
from echoshot_ai_server.engine.specs import ModelSpec
from echoshot_ai_server.errors import JobError
from echoshot_ai_server.media.tools import ffmpeg_version


@dataclass
class EnvironmentReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_environment(*, ffmpeg: str, ffprobe: str, weights_dir: Path, models: list[ModelSpec]) -> EnvironmentReport:
    report = EnvironmentReport()
    runtime = torch_runtime()
    report.lines.append(f"PyTorch 버전: {runtime['torch_version']}")
    report.lines.append(f"CUDA 사용 가능: {runtime['cuda_available']}")
    if runtime["cuda_available"]:
        report.lines.append(f"CUDA 버전: {runtime['cuda_version']}")
        report.lines.append(f"GPU: {runtime['gpu_name']}")
        report.lines.append(f"GPU 메모리: {runtime['gpu_memory_gb']:.2f} GB")
    for tool in (ffmpeg, ffprobe):
        try:
            report.lines.append(f"{tool}: {ffmpeg_version(tool)}")
        except JobError as exc:
            report.problems.append(exc.message)
            report.lines.append(f"❌ {exc.message}")
    for model in models:
        weights = weights_dir / model.weights_file
        if weights.is_file():
            report.lines.append(f"✅ 모델 가중치 확인: {weights}")
        else:
            problem = f"model weights not found: {weights} (download {model.url} there, or set WEIGHTS_DIR)"
            report.problems.append(problem)
            report.lines.append(f"❌ {problem}")
    return report
