from kcloud.cli import main

main()
