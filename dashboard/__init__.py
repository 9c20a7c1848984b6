"""Baton's web dashboard (`baton dashboard`): watch workers and executions live, act with a token."""
