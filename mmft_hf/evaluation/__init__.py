"""The paper's evaluation protocol (`mmft-hf benchmark`): splits, methods and cells, the CE baseline, results.

```python
from mmft_hf.evaluation import load_benchmark_splits, parse_method, run_cell
splits, protocol = load_benchmark_splits(dataset_dict, shots=16, seed=1)     # train / validation / test
record = run_cell(splits, parse_method("mmft"), args, load_model, dataset="dtd", shots=16, seed=1, protocol=protocol)
```
"""

from .ce_baseline import CETrainer, ZeroShotLinearClassifier, build_ce_trainer
from .fingerprint import (
    backbone_settings,
    cell_settings,
    check_settings,
    content_sha256,
    dataset_settings,
    hub_revision,
    retention_settings,
    settings_conflicts,
    settings_fingerprint,
)
from .protocol import (
    BASE_METHODS,
    FULL,
    LOW_SEED_MARK,
    METHOD_HELP,
    ZERO_SHOT,
    MethodSpec,
    check_method_arguments,
    load_benchmark_splits,
    parse_method,
    parse_shots,
    peak_memory,
    plan_cells,
    protocol_splits,
    run_cell,
    select_caption_types,
)
from .results import (
    RESULTS_FILENAME,
    aggregate,
    append_result,
    cell_key,
    plot_results,
    read_results,
    render_table,
    shared_results,
    unique_cells,
)
from .retention import RetentionSet, load_retention_set, zero_shot_accuracy
from .wise_ft_curve import DEFAULT_WISE_FT_ALPHAS, WiseFTSweep, best_alpha, plot_wise_ft_curve
