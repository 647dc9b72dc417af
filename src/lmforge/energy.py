"""Accelerator datasheets and the one energy model that every estimate uses.

The report card (`lmforge report`), the model card (`lmforge export`) and
`lmforge plan` all estimate a run's energy and CO2 here, with the same assumptions:

    energy (kWh)  = devices × power per device (W) × hours × PUE / 1000
    CO2 (kg CO2e) = energy (kWh) × grid intensity (kg CO2e per kWh)

- Power per device: a GPU's datasheet board power (TDP, `DEVICES`), an upper bound
  for the accelerator alone; a GPU whose model is not recorded counts as an H100.
  A CPU counts as one device of `CPU_WATTS_PER_CORE` per core: a server core under
  full load, package power / cores, an order of magnitude.
- PUE 1.2: data-centre overhead, a typical hyperscale value.
- Grid 0.4 kg CO2e/kWh: rounded from the world average of electricity generation
  (≈ 0.44–0.48 kg/kWh, IEA 2023, depending on the year counted).

All are stated assumptions, printed beside every estimate, to be overridden
(`lmforge plan --power-w --pue --grid`). This module imports nothing from lmforge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PUE = 1.2
GRID_KG_PER_KWH = 0.4
CPU_WATTS_PER_CORE = 10.0


@dataclass(frozen=True)
class Device:
    """One accelerator type: dense bf16 peak (no sparsity), memory, board power, price."""

    name: str
    peak_flops: float  # bf16 dense FLOP/s; fp32 runs use `fp32_flops`
    memory_gib: float
    power_w: float
    price_per_hour: float  # indicative on-demand US$ per device-hour (an assumption)
    fp32_flops: float = 0.0  # 0 = half the bf16 peak (TF32 tensor cores)


# Datasheet figures: NVIDIA H100/H200 SXM, A100 SXM, L40S, A10, and the Ada (RTX 4090)
# whitepaper (FP16/BF16 with FP32 accumulate, dense). Prices are rough 2024–2025 cloud
# on-demand rates, only a default: pass --price for your own.
DEVICES: dict[str, Device] = {
    "H200": Device("H200", 989e12, 141, 700, 3.50),
    "H100": Device("H100", 989e12, 80, 700, 2.50),
    "A100-80": Device("A100-80", 312e12, 80, 400, 1.80),
    "A100-40": Device("A100-40", 312e12, 40, 400, 1.30),
    "L40S": Device("L40S", 362e12, 48, 350, 1.00),
    "A10": Device("A10", 125e12, 24, 150, 0.75),
    "RTX4090": Device("RTX4090", 165e12, 24, 450, 0.50),
}
UNKNOWN_GPU = "H100"  # the board power assumed for a GPU whose model is not recorded


def cpu_power_w(cores: int | None = None) -> float:
    """Assumed draw of a CPU running on `cores` cores (default: every core of this machine)."""
    return CPU_WATTS_PER_CORE * (cores or os.cpu_count() or 1)


def device_power_w(device_type: str) -> float:
    """Assumed draw of one device of a run: "cpu" (the whole CPU) or "cuda" (one GPU)."""
    return DEVICES[UNKNOWN_GPU].power_w if device_type == "cuda" else cpu_power_w()


def energy_kwh(hours: float, power_w: float, devices: int = 1, pue: float = PUE) -> float:
    """Energy drawn from the grid by `devices` devices of `power_w` watts for `hours`."""
    return devices * power_w * hours * pue / 1000


def co2_kg(kwh: float, grid_kg_per_kwh: float = GRID_KG_PER_KWH) -> float:
    """Emissions of `kwh` at a grid intensity of `grid_kg_per_kwh` kg CO2e per kWh."""
    return kwh * grid_kg_per_kwh
