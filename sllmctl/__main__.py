from sllmctl.cli import main

main()
