"""The app's screens, one per mode: dashboard, models, data, chat, activity, review, keys."""

from .activity import ActivityScreen
from .chat import ChatScreen
from .dashboard import DashboardScreen
from .data import DataScreen
from .models import ModelsScreen

__all__ = ["ActivityScreen", "ChatScreen", "DashboardScreen", "DataScreen", "ModelsScreen"]
# KeysScreen (screens/keys.py) is imported from there: it builds on data.py's table helper.
