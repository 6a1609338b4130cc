"""The control plane: commands that change what runs on Google Cloud (deploy, redeploy, rollback)."""
