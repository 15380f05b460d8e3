"""The app's screens, one per mode: dashboard, models, data, chat, activity, review, keys."""

from x.activity import ActivityScreen
from x.chat import ChatScreen
from x.dashboard import DashboardScreen
from x.data import DataScreen
from x.models import ModelsScreen

__all__ = ["ActivityScreen", "ChatScreen", "DashboardScreen", "DataScreen", "ModelsScreen"]
# KeysScreen (screens/keys.py) is imported from there: it builds on data.py's table helper.
