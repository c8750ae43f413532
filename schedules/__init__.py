from .actions import Action, Layout
from .registry import SCHEDULES, build, check_args, get_layout
from .verify import Report, ScheduleError, verify
from .simulate import Costs, SimResult, bubble_table, simulate
from .timeline import draw_gantt, measured_bubble, to_chrome_trace
