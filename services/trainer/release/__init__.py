"""The release stage: canaries for new policies, promoted or rolled back on users' thumbs."""
