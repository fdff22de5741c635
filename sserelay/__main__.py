from sserelay.cli import main

main()
