"""The migrations, frozen: each imports no module of the project and reads no file."""
