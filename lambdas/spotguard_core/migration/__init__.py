"""Auto-migration of spot-reclaimed instances (the auto-migration seed), provider-agnostic.

``models`` holds the runtime settings and the job record, ``runner`` the job itself,
``store`` the jobs table adapter and ``providers`` the clouds (AWS EC2, Novita).
"""
