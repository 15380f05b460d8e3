"""The app's screens, one per mode: dashboard, models, data, chat, activity, review, keys."""

from tui.screens.activity import ActivityScreen
from tui.screens.chat import ChatScreen
from tui.screens.dashboard import DashboardScreen
from tui.screens.data import DataScreen
from tui.screens.models import ModelsScreen

__all__ = ["ActivityScreen", "ChatScreen", "DashboardScreen", "DataScreen", "ModelsScreen"]
# KeysScreen (screens/keys.py) is imported from there: it builds on data.py's table helper.
