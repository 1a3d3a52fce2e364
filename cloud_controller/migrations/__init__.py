"""Alembic migrations of the controller's schema (run by ``cloud_controller.database``)."""
