from .actions import Action, Layout
from .registry import SCHEDULES, build, check_args, get_layout
from .verify import Report, ScheduleError, verify
from .simulate import Costs, SimResult, bubble_table, simulate
from .timeline import draw_gantt, measured_bubble, to_chrome_trace
from .executor import PipelineExecutor, StepResult
from .weight_grad import SplitLinear, WeightGradStore, enable_weight_grad_split, run_backward
from .compat import DualPipe, DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes
